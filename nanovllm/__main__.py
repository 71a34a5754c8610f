import sys

from nanovllm.cli import main

if __name__ == "__main__":  # tensor-parallel workers are spawned: they re-import this module, not rerun it
    sys.exit(main())

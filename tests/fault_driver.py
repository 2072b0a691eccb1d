"""A script that tests/test_faults.py runs in a subprocess: a tiny run killed (``os._exit``,
no cleanup of any kind) after the k-th file operation of its checkpoint save at step
``KILL_STEP``, for every k, then resumed to the end; plus the same run uninterrupted.

    python tests/fault_driver.py OUT key=value ...

Every run is a forked child of this process (imports are paid once; no torch op runs in the
parent before a fork, and torch uses one thread everywhere, so all runs compute alike). Writes
``OUT/ref.safetensors`` (the uninterrupted run's parameters and log Z) and, for each k,
``OUT/k{k}.safetensors`` (after the resume) and ``OUT/report.json``: per k, the exit status of
the killed run, the label of the operation it was killed after, and the step resumed from.
"""

import json
import os
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import torch  # noqa: E402

torch.set_num_threads(1)

import safetensors.torch  # noqa: E402
import transformers.models.llama.modeling_llama  # noqa: E402, F401 (imported before forking)

from fastgfn.trainer import Trainer, load_config  # noqa: E402
from fastgfn.trainer.persistence import checkpoint as ckpt  # noqa: E402

KILL_STEP = 4
KILLED = 137


def _params(tr) -> dict:
    """Parameters (tied ones once) and log Z, as saved for the comparison."""
    out, seen = {}, set()
    for k, v in tr.engine.module.state_dict().items():
        if v.data_ptr() not in seen:
            seen.add(v.data_ptr())
            out[k] = v.detach().clone().contiguous()
    out["__log_z"] = tr.objective.log_z.param.detach().clone().reshape(1)
    return out


def _in_child(fn) -> int:
    """Run ``fn`` in a forked child; its exit status."""
    pid = os.fork()
    if pid == 0:
        code = 1
        try:
            fn()
            code = 0
        finally:
            sys.stdout.flush()
            os._exit(code)
    return os.waitstatus_to_exitcode(os.waitpid(pid, 0)[1])


def _kill_after(k: int, labels: list) -> None:
    """Count the file operations of the save at KILL_STEP; exit hard after the k-th."""
    armed = [False]

    def hook(label):
        if armed[0]:
            labels.append(label)
            if len(labels) == k:
                Path(os.environ["FAULT_LABEL_FILE"]).write_text(label)
                os._exit(KILLED)

    def writer(real, name):
        def write(*a, **kw):
            out = real(*a, **kw)
            hook(f"{name}:{Path(str(a[1])).name}")
            return out
        return write

    real_save = ckpt.save_checkpoint

    def save(engine, root, step, *a, **kw):
        armed[0] = step == KILL_STEP
        return real_save(engine, root, step, *a, **kw)

    ckpt.fault_hook = hook
    ckpt.save_checkpoint = save
    safetensors.torch.save_file = writer(safetensors.torch.save_file, "save_file")
    torch.save = writer(torch.save, "torch.save")


def main() -> None:
    out, overrides = Path(sys.argv[1]), sys.argv[2:]
    out.mkdir(parents=True, exist_ok=True)
    cfg = lambda run, *extra: load_config(None, [*overrides, f"output_dir={out / run}", *extra])

    def reference():
        tr = Trainer(cfg("ref"))
        tr.run()
        safetensors.torch.save_file(_params(tr), str(out / "ref.safetensors"))

    assert _in_child(reference) == 0
    report, k = {}, 0
    while True:
        k += 1
        label_file = out / f"k{k}.label"
        os.environ["FAULT_LABEL_FILE"] = str(label_file)
        status = _in_child(lambda k=k: (_kill_after(k, []), Trainer(cfg(f"k{k}")).run()))
        left = sorted(p.name for p in (out / f"k{k}" / "checkpoints").iterdir())

        def resume(k=k):
            tr = Trainer(cfg(f"k{k}", "resume=true"))
            assert tr.maybe_resume()
            Path(out / f"k{k}.from").write_text(str(tr.step))
            tr.cfg.run.resume = False
            tr.run()
            safetensors.torch.save_file(_params(tr), str(out / f"k{k}.safetensors"))

        resume_status = _in_child(resume)
        report[k] = {
            "status": status, "resume_status": resume_status,
            "label": label_file.read_text() if label_file.exists() else None,
            "resumed_from": int((out / f"k{k}.from").read_text()),
            "left_by_kill": left,
        }
        if status == 0:  # k is past the last operation of the save: every point is covered
            break
    (out / "report.json").write_text(json.dumps(report, indent=1))


if __name__ == "__main__":
    main()

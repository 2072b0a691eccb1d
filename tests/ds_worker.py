"""A script that tests/test_deepspeed.py runs under the DeepSpeed launcher
(`deepspeed --num_gpus K tests/ds_worker.py MODE OUT --deepspeed_config ... key=value ...`) to
look inside a multi-process run. Each rank writes what it saw to ``OUT/MODE_rank{r}.json``
(and tensors to ``OUT/*.safetensors``); the test process makes the assertions.

MODE
  reward  ZeRO-3 + continuation: how the frozen reward model is partitioned, its log-rewards
          (rank-dependent rows of different lengths) against an unsharded copy of the initial
          weights, before and after a short training run.
  resume  a run with resume=true: the state right after the checkpoint is loaded (full
          parameters, step, log Z, replay buffer, RNG states), then the run goes on.
  restart the configured run stopped after ``stop_after_steps`` steps with a checkpoint,
          then a new trainer in the same processes resumes it to the end (one launch
          instead of two), once per config of ``--deepspeed_config A.json,B.json``; records
          the optimizer DeepSpeed runs and its offloads.
  hostile once per config of ``--deepspeed_config A.json,B.json``: a run whose rewards are
          NaN at step 2 (skipped?), then its newest checkpoint's model states replaced by a
          pickle that writes a marker file when unpickled (manifest rewritten to match), and
          a resume (the marker must never appear).
  tool    the arithmetic task with the calculator: ``model=tiny`` builds the taught model
          of ``OUT/taught.safetensors`` (tests/arith_tiny.py); counts, per rank, the sampled
          rows, their tool tokens and actions, and the replay entries that kept a mask.
"""

import json
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from fastgfn.train import build_config, parse_args
from fastgfn.trainer import Trainer  # noqa: E402
from fastgfn.trainer.engines.distributed import exit_rank, shutdown_distributed  # noqa: E402


def _write(out: Path, name: str, obj) -> None:
    out.mkdir(parents=True, exist_ok=True)
    (out / name).write_text(json.dumps(obj))


def reward(tr: Trainer, out: Path) -> None:
    import copy

    from fastgfn.trainer.model.loading import build_tiny
    from fastgfn.trainer.model.reward import RewardLM, build_reward_lm

    task, r = tr.task, tr.rank
    ref_model, _ = build_tiny(tr.cfg)  # the initial weights, whole, never trained
    ref_model.eval()
    # different rows and lengths on each rank: ZeRO-3 gathers must still pair up
    rows = [[5 + r, 6, 7, 8 + r][: 1 + (i + r) % 4] for i in range(3 + r)]
    T = max(len(x) for x in rows)

    ref_task = copy.copy(task)  # the same task scored by the unsharded copy
    ref_task.reward = RewardLM(ref_model)

    def compare():
        got = task.log_rewards(0, rows, T)
        want = ref_task.log_rewards(0, rows, T)
        return float((got - want).abs().max()), got.tolist()

    params = list(task.reward_model.parameters())
    shard = [
        {
            "ds_numel": int(getattr(p, "ds_numel", -1)),
            "local": int(p.ds_tensor.numel()) if hasattr(p, "ds_tensor") else -1,
            "numel": int(p.numel()),
        }
        for p in params
    ]
    # A model loaded from a directory takes the other branch: loaded a second time, built
    # partitioned (zero.Init through HfDeepSpeedConfig), then the inference engine.
    hf_dir = out / "tiny_hf"
    if r == 0:
        ref_model.save_pretrained(hf_dir, safe_serialization=True)
    torch.distributed.barrier()
    loaded = copy.copy(tr)
    loaded.cfg = tr.cfg.replace(model=str(hf_dir))
    loaded_task = copy.copy(task)
    loaded_task.reward = build_reward_lm(loaded.cfg, None, tr.tokenizer, tr.engine.ds_config)
    loaded_shard = [
        [int(p.ds_numel), int(p.ds_tensor.numel()), int(p.numel())]
        for p in loaded_task.reward_model.parameters()
    ]
    got = loaded_task.log_rewards(0, rows, T)
    err_loaded = float((got - ref_task.log_rewards(0, rows, T)).abs().max())

    with tr.engine.full_parameters() as m:
        before = {k: v.detach().clone() for k, v in m.named_parameters()}
    err0, vals = compare()
    tr.run()
    err1, _ = compare()
    with tr.engine.full_parameters() as m:
        moved = any(not torch.equal(before[k], v) for k, v in m.named_parameters())
    _write(
        out,
        f"reward_rank{r}.json",
        {
            "world": tr.world,
            "shard": shard,
            "err_before": err0,
            "err_after": err1,
            "loaded_shard": loaded_shard,
            "err_loaded": err_loaded,
            "values": vals,
            "policy_changed": moved,
            "reward_is_policy": task.reward_model is tr.engine.module,
        },
    )


def resume(tr: Trainer, out: Path) -> None:
    from safetensors.torch import save_file

    loaded = tr.maybe_resume

    def hooked():
        ok = loaded()
        with tr.engine.full_parameters() as m:
            state = {k: v.detach().float().clone().contiguous() for k, v in m.named_parameters()}
        if tr.rank == 0:
            save_file(state, str(out / "resumed_params.safetensors"))
        save_file(
            {
                "generator": tr.streams.generator.get_state(),
                "py_rng": torch.tensor(tr.streams.py_rng.getstate()[1], dtype=torch.int64),
            },
            str(out / f"resumed_rng_rank{tr.rank}.safetensors"),
        )
        _write(
            out,
            f"resume_rank{tr.rank}.json",
            {
                "resumed": ok,
                "world": tr.world,
                "step": tr.step,
                "log_z": tr.objective.log_z.value(),
                "buffer": tr.buffer.state_dict(),
                "lr": tr.engine.lr(),
            },
        )
        return ok

    tr.maybe_resume = hooked
    tr.run()


def _optimizer_info(tr: Trainer) -> dict:
    """The optimizer DeepSpeed runs and what its ZeRO optimizer offloads."""
    zero = tr.engine.engine.optimizer
    return {
        "optimizer": type(tr.engine.engine.basic_optimizer).__name__,
        "offload_optimizer": bool(
            getattr(zero, "cpu_offload", False) or getattr(zero, "offload_optimizer", False)
        ),
        "offload_param": bool(getattr(zero, "offload_param", False)),
    }


def restart(cfg, out: Path, ds_configs: list[str]) -> None:
    """For each DeepSpeed config in turn (in the same processes): the run stopped after
    ``stop_after_steps`` with a checkpoint, then a new trainer resumes it to the end.
    ``output_dir`` and ``export_dir`` get the config's file stem appended."""

    if not (cfg.run.stop_after_steps and cfg.run.save_every):
        raise ValueError("restart: needs stop_after_steps and save_every")
    for ds in ds_configs:
        stem = Path(ds).stem
        run = cfg.replace(deepspeed_config=ds,
            output_dir=str(Path(cfg.run.output_dir) / stem),
            export_dir=str(Path(cfg.run.export_dir) / stem) if cfg.run.export_dir else None,
        )
        tr = Trainer(run)
        tr.run()
        again = Trainer(run.replace(resume=True, stop_after_steps=0))
        seen = {"resumed": again.maybe_resume(), **_optimizer_info(again)}
        _write(out, f"restart_{stem}_rank{tr.rank}.json", seen)
        again.cfg.run.resume = False  # resumed just now
        again.run()


class _Evil:
    """Unpickling this writes ``path``: what a crafted checkpoint file could do."""

    def __init__(self, path):
        self.path = str(path)

    def __reduce__(self):
        return (exec, (f"open({self.path!r}, 'w').write('pwned')",))


def hostile(cfg, out: Path, ds_configs: list[str]) -> None:
    import math

    from fastgfn.trainer.persistence.checkpoint import latest_checkpoint
    from fastgfn.trainer.persistence.checkpoint_files import write_marker

    for ds in ds_configs:
        stem = Path(ds).stem
        run = cfg.replace(deepspeed_config=ds,
                                  output_dir=str(Path(cfg.run.output_dir) / stem))
        tr = Trainer(run)
        real = tr.task.log_rewards

        def log_rewards(p, rows, T, real=real, tr=tr):
            r = real(p, rows, T)
            if tr.step + 1 == 2:
                r[:, 0] = float("nan")
            return r

        tr.task.log_rewards = log_rewards
        tr.run()
        with tr.engine.full_parameters() as m:
            finite = all(bool(torch.isfinite(v).all()) for v in m.parameters())
        lines = [json.loads(x) for x in (Path(run.run.output_dir) / "metrics.jsonl").read_text()
                 .splitlines()]
        entries = tr.buffer.state_dict()["entries"].values()
        newest = latest_checkpoint(Path(run.run.output_dir) / "checkpoints")
        marker = out / f"pwned_{stem}"
        for f in newest.glob("*model_states.pt"):
            torch.save({"module": _Evil(marker)}, f)
        write_marker(newest, tr.step)
        again = Trainer(run.replace(resume=True))
        resumed = again.maybe_resume()
        _write(out, f"hostile_{stem}_rank{tr.rank}.json", {
            "skipped": [x["skipped"] for x in lines if "loss" in x],
            "finite": finite, "log_z": tr.objective.log_z.value(),
            "buffer_finite": all(math.isfinite(lr) for v in entries for lr, _ in v),
            "newest": newest.name, "resumed": resumed, "resumed_step": again.step,
            "marker": marker.exists(),
        })


def tool(cfg, out: Path) -> None:
    from safetensors.torch import load_file

    from tests.arith_tiny import patch_build_tiny

    patch_build_tiny(load_file(str(out / "taught.safetensors")))
    tr = Trainer(cfg)
    seen = {"rows": 0, "tool_tokens": 0, "actions": []}
    real = tr.batches._sample

    def counted(prompt_index):
        batch = real(prompt_index)
        for m in batch.masks():
            seen["rows"] += 1
            seen["tool_tokens"] += m.count(False)
            seen["actions"].append(m.count(True))
        return batch

    tr.batches._sample = counted
    tr.run()
    entries = tr.buffer.state_dict()["entries"].values()
    seen["masked_entries"] = sum(len(e) == 3 for v in entries for e in v)
    _write(out, f"tool_rank{tr.rank}.json", seen)


def main() -> None:
    argv = [a for a in sys.argv[1:] if not a.startswith("--local_rank")]  # the launcher's
    mode, out = argv[0], Path(argv[1])
    args = parse_args(argv[2:])
    out.mkdir(parents=True, exist_ok=True)
    if mode in ("restart", "hostile"):  # --deepspeed_config A.json[,B.json,...]
        ds_configs = args.deepspeed_config.split(",")
        args.deepspeed_config = ds_configs[0]
        {"restart": restart, "hostile": hostile}[mode](build_config(args), out, ds_configs)
    elif mode == "tool":
        tool(build_config(args), out)
    else:
        tr = Trainer(build_config(args))
        {"reward": reward, "resume": resume}[mode](tr, out)
    shutdown_distributed()
    exit_rank(0)


if __name__ == "__main__":
    main()

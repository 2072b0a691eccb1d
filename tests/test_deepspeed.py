"""Multi-process DeepSpeed runs on CPU (gloo): `deepspeed --num_gpus 2 fastgfn/train.py` with a
tiny random model under ZeRO-2 and ZeRO-3. With every rank sampling the same data, the
averaged gradient equals the single-process gradient, so the loss curves must match the
plain single-process run; checkpoints saved under ZeRO resume (in the same and in another
number of processes), and ZeRO-3 exports a Hugging Face directory that loads back. LoRA runs
under both stages; the continuation task's frozen reward LM is ZeRO-3-partitioned. ZeRO-2
with optimizer offload and ZeRO-3 with optimizer and parameter offload to CPU run DeepSpeed's
CPU Adam on the same curve, with fastgfn's learning-rate schedule and weight decay.
`tests/ds_worker.py` looks inside a launched run where the test needs to."""

import json
import math
import os
import shutil
import socket
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
pytestmark = pytest.mark.slow

ARGS = [
    "model=tiny",
    "tiny_hidden=32",
    "batch_size=8",
    "max_new_tokens=3",
    "progress=false",
    "eval_samples=0",
    "tensorboard=false",
    "same_data_all_ranks=true",
    "lr=1e-3",
    "warmup_steps=0",
    "lr_schedule=constant",  # runs of different lengths share the curve's prefix
    "loss=tb",
    "replay_prob=0.5",
]


def _deepspeed():
    exe = Path(sys.executable).parent / "deepspeed"
    if not exe.exists() and shutil.which("deepspeed") is None:
        pytest.skip("the deepspeed launcher is not installed")
    try:
        import deepspeed  # noqa: F401
    except ImportError:
        pytest.skip("deepspeed is not installed")
    return str(exe) if exe.exists() else shutil.which("deepspeed")


def _losses(out: Path):
    lines = [json.loads(x) for x in (out / "metrics.jsonl").read_text().splitlines()]
    return [x["loss"] for x in lines if "loss" in x]


def _free_port() -> int:
    """A port nothing listens on now (the OS picks it), for one launcher's rendezvous: a
    fixed port may be taken on the machine, or linger in TIME_WAIT from the last launch."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def _launch(ds_config: str, out: Path, extra=(), procs=2, worker=None, args=ARGS):
    """``deepspeed --num_gpus procs`` on train.py, or on tests/ds_worker.py with
    ``worker=(MODE, OUT)``; ``procs=0``: one plain ``python`` process, no launcher."""
    env = dict(os.environ, PYTHONPATH=str(ROOT), OMP_NUM_THREADS="1")
    script = ["fastgfn/train.py"] if worker is None else ["tests/ds_worker.py", *worker]
    launcher = [_deepspeed(), "--num_gpus", str(procs), "--master_port", str(_free_port())]
    if procs == 0:
        _deepspeed()  # skips the test where deepspeed is missing
        launcher = [sys.executable]
    cmd = [
        *launcher,
        *script,
        "--deepspeed_config",
        ds_config,
        *args,
        f"output_dir={out}",
        *extra,
    ]
    res = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)
    assert res.returncode == 0, res.stdout[-3000:] + res.stderr[-3000:]
    return res


def _ds(stage) -> str:
    return str(ROOT / "configs" / f"ds_zero{stage}.json")


def _close(losses, single):
    assert 0 < len(losses) <= len(single), (losses, single)
    for a, b in zip(losses, single):
        assert abs(a - b) <= 1e-3 * max(1.0, abs(b)), (losses, single)


@pytest.fixture(scope="module")
def single(tmp_path_factory):
    from fastgfn.trainer import Trainer, load_config

    out = tmp_path_factory.mktemp("single")
    Trainer(load_config(None, ARGS + ["steps=6", f"output_dir={out}"])).run()
    return _losses(out)


@pytest.fixture(scope="module")
def saved(tmp_path_factory):
    """``saved(stage)``: the output directory of a 2-process run of 4 steps stopped after
    step 2 with a checkpoint (launched once per stage, copied by each test)."""
    runs = {}

    def get(stage: int) -> Path:
        if stage not in runs:
            out = tmp_path_factory.mktemp(f"zero{stage}") / "run"
            _launch(_ds(stage), out, ["steps=4", "stop_after_steps=2", "save_every=2"])
            runs[stage] = out
        return runs[stage]

    return get


@pytest.mark.parametrize("stage", [2, 3])
def test_zero_matches_single_process_and_resumes(tmp_path, single, saved, stage):
    out = tmp_path / "run"
    shutil.copytree(saved(stage), out)
    _launch(
        _ds(stage), out, ["steps=4", "resume=true", "save_every=2", f"export_dir={tmp_path / 'hf'}"]
    )
    _close(_losses(out), single)
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(tmp_path / "hf")
    assert sum(p.numel() for p in model.parameters()) > 0


@pytest.fixture(scope="module")
def one_process(tmp_path_factory, saved):
    """``one_process(stage)``: (run directory, worker report) of the 2-process checkpoint of
    ``saved`` resumed in 1 process to step 4, saving a checkpoint there: under the launcher
    (`deepspeed --num_gpus 1`) for ZeRO-3, a plain `python` process for ZeRO-2."""
    runs = {}

    def get(stage: int):
        if stage not in runs:
            out = tmp_path_factory.mktemp(f"one{stage}") / "run"
            look = out.parent / "look"
            shutil.copytree(saved(stage), out)
            args = ["steps=4", "resume=true", "save_every=2"]
            procs = 1 if stage == 3 else 0
            _launch(_ds(stage), out, args, procs=procs, worker=("resume", look))
            runs[stage] = out, look
        return runs[stage]

    return get


@pytest.mark.parametrize("stage", [2, 3])
def test_checkpoint_of_two_processes_resumes_in_one(single, saved, one_process, stage):
    """2 -> 1 process: the engine converts the checkpoint to DeepSpeed's universal format
    (DeepSpeed 0.19 refuses a plain ZeRO checkpoint of another world size) and loads it;
    parameters, step, log Z, replay buffer and RNG states come back exactly, and the run
    goes on along the single-process loss curve (so the Adam moments came back too)."""
    import torch
    from deepspeed.utils.zero_to_fp32 import get_fp32_state_dict_from_zero_checkpoint
    from safetensors.torch import load_file

    ckpt = saved(stage) / "checkpoints" / "step_00000002"
    before = get_fp32_state_dict_from_zero_checkpoint(str(ckpt.parent), tag=ckpt.name)
    client = json.loads((ckpt / "client_state.json").read_text())
    rng = load_file(str(ckpt / "rng_rank0.safetensors"))
    out, look = one_process(stage)

    seen = json.loads((look / "resume_rank0.json").read_text())
    assert seen["resumed"] and seen["world"] == 1 and client["world_size"] == 2
    assert seen["step"] == client["step"] == 2
    assert seen["log_z"] == client["log_z"] != 0.0
    assert seen["buffer"] == client["buffer"] and client["buffer"]["entries"]
    after = load_file(str(look / "resumed_params.safetensors"))
    assert after.keys() <= before.keys() and len(after) > 10
    for k, v in after.items():
        assert torch.equal(v, before[k].float()), k
    mine = load_file(str(look / "resumed_rng_rank0.safetensors"))
    assert torch.equal(mine["generator"], rng["generator"])
    assert torch.equal(mine["py_rng"], rng["py_rng"])
    assert (out / "checkpoints" / "step_00000002" / "universal").is_dir()
    losses = _losses(out)
    assert len(losses) == 4
    _close(losses, single)


def test_checkpoint_of_one_process_resumes_in_two(tmp_path, single, one_process):
    """1 -> 2 processes under ZeRO-3: the step-4 checkpoint of the 1-process run above goes
    on to step 6 in 2 processes (each rank takes its partition of the universal checkpoint;
    the new rank 1 takes rank 0's RNG state, as every rank samples the same data here), on
    the single-process loss curve."""
    out = tmp_path / "run"
    shutil.copytree(one_process(3)[0], out)
    meta = json.loads((out / "checkpoints" / "step_00000004" / "engine.json").read_text())
    assert meta == {"kind": "deepspeed", "zero_stage": 3, "world_size": 1}
    _launch(_ds(3), out, ["steps=6", "resume=true"], procs=2)
    losses = _losses(out)
    assert len(losses) == 6
    _close(losses, single)


def test_plain_process_refuses_a_deepspeed_checkpoint(tmp_path, saved):
    from fastgfn.trainer import Trainer, load_config

    out = tmp_path / "run"
    shutil.copytree(saved(2), out)
    tr = Trainer(load_config(None, ARGS + ["steps=4", "resume=true", f"output_dir={out}"]))
    with pytest.raises(ValueError, match=r"DeepSpeed engine \(ZeRO-2, 2 process.*deepspeed"):
        tr.run()


def test_deepspeed_engine_refuses_other_stage_or_engine(tmp_path, saved):
    """The checks run before DeepSpeed is touched, so a stand-in engine object will do."""
    from types import SimpleNamespace

    from fastgfn.trainer import Trainer, load_config
    from fastgfn.trainer.engines.deepspeed_engine import (
        DeepSpeedEngine,
        ensure_universal_checkpoint,
    )

    ckpt = saved(2) / "checkpoints" / "step_00000002"
    zero3 = SimpleNamespace(kind="deepspeed", zero_stage=3)
    with pytest.raises(ValueError, match="saved under ZeRO-2 but .* ZeRO-3"):
        DeepSpeedEngine.load(zero3, ckpt)
    plain = tmp_path / "plain"
    tr = Trainer(load_config(None, ARGS + ["steps=1", "save_every=1", f"output_dir={plain}"]))
    tr.run()
    with pytest.raises(ValueError, match="one plain process"):
        DeepSpeedEngine.load(zero3, plain / "checkpoints" / "step_00000001")
    with pytest.raises(ValueError, match="no fastgfn engine checkpoint"):
        DeepSpeedEngine.load(zero3, tmp_path)
    bad = tmp_path / "bad"
    bad.mkdir()
    (bad / "engine.json").write_text('{"kind": "deepspeed", "zero_stage": 3, "world_size": 2}')
    with pytest.raises(ValueError, match="ds_to_universal"):
        ensure_universal_checkpoint(bad)


def test_frozen_reward_lm_is_zero3_partitioned(tmp_path):
    """Continuation task under ZeRO-3 on 2 processes: every parameter of the frozen reward LM
    is partitioned (each rank holds half, nothing gathered at rest), its log-rewards (rows of
    different lengths on each rank) equal those of an unsharded copy of the initial weights
    to 1e-5 before and after training (also for a model loaded from a directory, which is
    built partitioned), and the ranks sample different data with replay without a collective
    mismatch."""
    prompts = tmp_path / "prompts.txt"
    prompts.write_text("The sky is blue.\nA cat sat on the mat.\n")
    look = tmp_path / "look"
    extra = [
        "task=continuation",
        f"data_path={prompts}",
        "termination=.",
        "max_new_tokens=4",
        "steps=3",
        "lr=1e-2",
        "same_data_all_ranks=false",
    ]
    _launch(_ds(3), tmp_path / "run", extra, worker=("reward", look))
    for r in range(2):
        seen = json.loads((look / f"reward_rank{r}.json").read_text())
        assert seen["world"] == 2 and not seen["reward_is_policy"] and seen["policy_changed"]
        assert len(seen["shard"]) > 10
        for p in seen["shard"]:
            assert p["ds_numel"] > 0 and p["numel"] == 0, p
            assert p["local"] == -(-p["ds_numel"] // 2), p
        assert seen["err_before"] <= 1e-5 and seen["err_after"] <= 1e-5, seen
        # the same from a model directory (loaded again, built partitioned)
        assert len(seen["loaded_shard"]) == len(seen["shard"])
        for total, local, numel in seen["loaded_shard"]:
            assert total > 0 and numel == 0 and local == -(-total // 2)
        assert seen["err_loaded"] <= 1e-5, seen
        assert len(seen["values"]) == 3 + r
    assert len(_losses(tmp_path / "run")) == 3


def test_reasoning_task_under_zero3(tmp_path):
    """The reasoning task on 2 ZeRO-3 processes that sample different data (rationales of
    different lengths, so different numbers of (row, prefix) pairs per rank): its answer pass
    makes the same partitioned-LM calls on every rank (no hang), log Z set from the first
    batch is averaged over the ranks, and the answer accuracy counts each question once."""
    data = tmp_path / "data.jsonl"
    data.write_text('{"question": "1+2", "answer": "3"}\n{"question": "4-1", "answer": "3"}\n')
    extra = [
        "task=reasoning",
        f"data_path={data}",
        "termination=.",
        "max_new_tokens=4",
        "steps=3",
        "loss=subtb",
        "log_z_auto_init=true",
        "same_data_all_ranks=false",
        "eval_samples=4",
        "eval_rationales=2",
        "eval_questions=3",
    ]
    res = _launch(_ds(3), tmp_path / "run", extra)
    losses = _losses(tmp_path / "run")
    assert len(losses) == 3 and all(math.isfinite(x) for x in losses)
    # answer accuracy: 2 questions over 2 ranks (one each, the padding repeat not counted)
    lines = [json.loads(x) for x in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    evals = [x for x in lines if "eval_after/answer_questions" in x]
    assert len(evals) == 1 and evals[0]["eval_after/answer_questions"] == 2
    assert evals[0]["eval_after/answer_accuracy"] in (0.0, 0.5, 1.0)
    # rank 0 reports the value averaged over the ranks
    assert (res.stdout + res.stderr).count("log Z initialised to") == 1


def test_lora_matches_single_process_and_resumes(tmp_path):
    """LoRA (PEFT) on the continuation task (the reward: the same model, adapters off) on 2
    processes, ZeRO-2 then ZeRO-3 (one launch): 2 steps, checkpoint, a new trainer resumes,
    2 more steps; the loss curve is the single-process LoRA run's; only adapter weights
    train; the merged export loads."""
    from fastgfn.trainer import Trainer, load_config

    prompts = tmp_path / "prompts.txt"
    prompts.write_text("The sky is blue.\nA cat sat on the mat.\n")
    args = ARGS + [
        "lora=true",
        "task=continuation",
        f"data_path={prompts}",
        "termination=.",
        "max_new_tokens=4",
        "lr=1e-2",
        "steps=4",
    ]
    ref = tmp_path / "single"
    tr = Trainer(load_config(None, args + [f"output_dir={ref}"]))
    assert all("lora_" in k for k, p in tr.engine.module.named_parameters() if p.requires_grad)
    tr.run()
    out, look, hf = tmp_path / "run", tmp_path / "look", tmp_path / "hf"
    extra = ["stop_after_steps=2", "save_every=2", f"export_dir={hf}"]
    both = f"{_ds(2)},{_ds(3)}"
    _launch(both, out, extra, args=args, worker=("restart", look))
    from transformers import AutoModelForCausalLM

    for stage in (2, 3):
        name = f"ds_zero{stage}"
        assert json.loads((look / f"restart_{name}_rank1.json").read_text())["resumed"]
        losses = _losses(out / name)
        assert len(losses) == 4
        _close(losses, _losses(ref))
        model = AutoModelForCausalLM.from_pretrained(hf / name)
        assert not any("lora" in k for k in model.state_dict())


def test_new_rank_gets_its_own_sampling_stream(tmp_path):
    """A rank the saving run did not have (resume on more processes) starts from rank 0's RNG
    state only when every rank samples the same data; otherwise it gets its own stream,
    deterministic in (seed, rank, step). One process, playing rank 1 of 2."""
    from fastgfn.trainer import Trainer, load_config

    out = tmp_path / "run"
    cfg = ARGS + ["steps=4", "stop_after_steps=2", "save_every=2", f"output_dir={out}"]
    Trainer(load_config(None, cfg)).run()

    def resumed(same: bool):
        # saved with same_data_all_ranks=true: a change on resume needs the override
        over = ["resume=true", f"same_data_all_ranks={same}", "allow_config_change=true"]
        tr = Trainer(load_config(None, cfg + over))
        tr.rank, tr.world = 1, 2
        assert tr.maybe_resume() and tr.step == 2
        return tr.streams.generator.get_state(), tr.streams.py_rng.random()

    import torch
    from safetensors.torch import load_file

    saved = load_file(str(out / "checkpoints" / "step_00000002" / "rng_rank0.safetensors"))
    gen_same, _ = resumed(True)
    assert torch.equal(gen_same, saved["generator"])
    gen_own, draw = resumed(False)
    assert not torch.equal(gen_own, saved["generator"])
    again, draw_again = resumed(False)
    assert torch.equal(gen_own, again) and draw == draw_again


def test_gradient_accumulation_matches_the_torch_engine(tmp_path):
    """grad_accum=2 under DeepSpeed steps the optimizer once per training step, as the torch
    engine does (DeepSpeed counts micro-batches in ``engine.step()``, which must run after
    every micro-batch): the same loss curve, here in one process with the DeepSpeed engine."""
    from fastgfn.trainer import Trainer, load_config

    extra = ["steps=4", "grad_accum=2"]
    Trainer(load_config(None, ARGS + extra + [f"output_dir={tmp_path / 'torch'}"])).run()
    _launch(_ds(2), tmp_path / "ds", extra, procs=0)
    _close(_losses(tmp_path / "ds"), _losses(tmp_path / "torch"))


def test_nan_steps_skipped_and_checkpoints_never_unpickled(tmp_path):
    """One process, DeepSpeed engine, no ZeRO (stage 0), ZeRO-2 and ZeRO-3: a step with NaN
    rewards is skipped (finite weights and log Z, clean replay buffer); a crafted model-states
    file whose unpickling would write a marker (the manifest rewritten to match) is refused
    with one line naming it, resume falls back to the checkpoint before, and the marker never
    appears (DeepSpeed's files load with weights_only=True)."""
    zero0 = tmp_path / "ds_zero0.json"
    zero0.write_text(json.dumps({"zero_optimization": {"stage": 0}}))
    look = tmp_path / "look"
    configs = ",".join([str(zero0), _ds(2), _ds(3)])
    res = _launch(configs, tmp_path / "run", ["steps=3", "save_every=1", "save_model=false"],
                  procs=0, worker=("hostile", look))
    for stem in ("ds_zero0", "ds_zero2", "ds_zero3"):
        seen = json.loads((look / f"hostile_{stem}_rank0.json").read_text())
        assert seen["skipped"] == [0, 1, 0], (stem, seen)
        assert seen["finite"] and math.isfinite(seen["log_z"]) and seen["buffer_finite"], seen
        assert seen["newest"] == "step_00000003" and seen["resumed"], seen
        assert seen["resumed_step"] == 2 and not seen["marker"], seen
        assert not (look / f"pwned_{stem}").exists()
    out = res.stdout + res.stderr
    assert "refused: it holds pickled objects" in out and "model_states.pt" in out


def test_infilling_task_under_zero3(tmp_path):
    """The story-infilling task on 2 ZeRO-3 processes that sample different stories (prompts
    and reward contexts of different lengths) and middles of different lengths: the reward
    LM's passes (the middles, then STOP Y after every prefix) run on the partitioned model
    without a hang, the losses are finite, and the export gathers a loadable model."""
    from transformers import AutoModelForCausalLM

    fixture = ROOT / "fastgfn" / "data" / "stories" / "fixture.csv"
    extra = [
        "task=infilling",
        f"data_path={fixture}",
        "prompt_template=B: {beginning} E: {ending} M:",
        "heldout_fraction=0.25",
        "termination=.",
        "max_new_tokens=4",
        "steps=3",
        "loss=subtb",
        "log_z_auto_init=true",
        "same_data_all_ranks=false",
    ]
    _launch(_ds(3), tmp_path / "run", extra)
    losses = _losses(tmp_path / "run")
    assert len(losses) == 3 and all(math.isfinite(x) for x in losses)
    model = AutoModelForCausalLM.from_pretrained(tmp_path / "run" / "model")
    assert model.config.hidden_size == 32


def test_offload_matches_single_process_and_resumes(tmp_path, single):
    """ZeRO-2 with the optimizer offloaded to CPU and ZeRO-3 with optimizer and parameters
    offloaded (configs/ds_zero2_offload.json, ds_zero3_offload.json) on 2 processes, one
    launch: DeepSpeed's CPU Adam is the optimizer, each run stops after step 2 with a
    checkpoint, a new trainer resumes it to step 4, and the loss curve is the single-process
    one to 1e-3."""
    out, look = tmp_path / "run", tmp_path / "look"
    both = f"{_ds('2_offload')},{_ds('3_offload')}"
    extra = ["steps=4", "stop_after_steps=2", "save_every=2"]
    _launch(both, out, extra, worker=("restart", look))
    for name, params in (("ds_zero2_offload", False), ("ds_zero3_offload", True)):
        for r in range(2):
            seen = json.loads((look / f"restart_{name}_rank{r}.json").read_text())
            assert seen == {
                "resumed": True,
                "optimizer": "DeepSpeedCPUAdam",
                "offload_optimizer": True,
                "offload_param": params,
            }, (name, seen)
        losses = _losses(out / name)
        assert len(losses) == 4
        _close(losses, single)


def test_offload_follows_fastgfn_schedule_and_weight_decay(tmp_path):
    """The optimizer DeepSpeed builds under offload takes fastgfn's lr, weight decay, warm-up
    and cosine schedule (and grad_accum): one process, the same loss and learning-rate curve
    as the torch engine's AdamW."""
    from fastgfn.trainer import Trainer, load_config

    extra = ["steps=4", "warmup_steps=2", "lr_schedule=cosine", "weight_decay=100",
             "grad_accum=2"]
    Trainer(load_config(None, ARGS + extra + [f"output_dir={tmp_path / 'torch'}"])).run()
    _launch(_ds("2_offload"), tmp_path / "ds", extra, procs=0)
    _close(_losses(tmp_path / "ds"), _losses(tmp_path / "torch"))

    def lrs(out):
        lines = [json.loads(x) for x in (out / "metrics.jsonl").read_text().splitlines()]
        return [x["lr"] for x in lines if "lr" in x]

    want = lrs(tmp_path / "torch")
    assert len(set(want)) >= 3  # the schedule moves the rate (warm-up, cosine decay)
    assert lrs(tmp_path / "ds") == pytest.approx(want, rel=1e-12)


def test_arithmetic_tool_under_zero3(tmp_path):
    """The arithmetic task with the calculator on 2 ZeRO-3 processes that sample different
    questions: rows receive tool results at different steps on each rank (the sampler's
    all-ranks "done" flag keeps the partitioned forwards paired), the loss reads actions
    only, every rank's rows hold at most max_new_tokens actions, the losses are finite and
    the replay buffer keeps the masks."""
    from safetensors.torch import save_file

    from tests.arith_tiny import pretrained_state

    save_file(pretrained_state(), str(tmp_path / "taught.safetensors"))
    extra = [
        "--config", "configs/arithmetic.yaml",
        "max_new_tokens=12",
        "min_new_tokens=1",
        "steps=3",
        "loss=subtb",
        "fewshot_examples=1",
        "same_data_all_ranks=false",
        "eval_questions=0",
        "save_model=false",
    ]
    _launch(_ds(3), tmp_path / "run", extra, worker=("tool", str(tmp_path)))
    losses = _losses(tmp_path / "run")
    assert len(losses) == 3 and all(math.isfinite(x) for x in losses)
    for r in range(2):
        seen = json.loads((tmp_path / f"tool_rank{r}.json").read_text())
        assert seen["rows"] >= 8 and seen["tool_tokens"] > 0, seen
        assert max(seen["actions"]) <= 12, seen
        assert seen["masked_entries"] > 0, seen

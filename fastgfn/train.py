"""fastgfn training entry point: parses the command line and hands over to
``fastgfn.trainer.Trainer``.

    deepspeed [--num_gpus K] fastgfn/train.py --config CONFIG.yaml \
        [--deepspeed_config ds.json] [key=value ...]
    python -m fastgfn.train [--config CONFIG.yaml] [key=value ...]      # one plain process
    fastgfn-train ...                                                    # console script

With no arguments it runs the embedded default: full-parameter GFlowNet fine-tuning of the
packaged SmolLM2-135M-Instruct on the random-number task, on CPU, with a before/after table,
and saves the fine-tuned model under runs/default/model.
"""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path

if __package__ in (None, ""):  # run as a script: `deepspeed fastgfn/train.py`
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from fastgfn.trainer.config_loading import load_config  # noqa: E402
from fastgfn.trainer.errors import FastgfnError  # noqa: E402


def parse_args(argv=None):
    p = argparse.ArgumentParser(
        description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter
    )
    p.add_argument("--config", default=None,
                   help="YAML config: a file, or a packaged config's name (default: the default "
                        "run)")
    p.add_argument("--deepspeed_config", "--deepspeed-config", default=None,
                   help="DeepSpeed JSON config (ZeRO-2/3)")
    p.add_argument("--local_rank", "--local-rank", type=int, default=None,
                   help="set by the DeepSpeed launcher (LOCAL_RANK is also read)")
    p.add_argument("--resume", action="store_true",
                   help="continue from the newest complete checkpoint under output_dir")
    p.add_argument("--allow_config_change", "--allow-config-change", action="store_true",
                   help="with --resume: apply settings that differ from the checkpoint's")
    p.add_argument("overrides", nargs="*", help="key=value config overrides")
    return p.parse_intermixed_args(argv)


def build_config(args):
    overrides = list(args.overrides)
    if args.deepspeed_config:
        overrides.append(f"deepspeed_config={args.deepspeed_config}")
    if args.resume:
        overrides.append("resume=true")
    if args.allow_config_change:
        overrides.append("allow_config_change=true")
    return load_config(args.config, overrides)


def main(argv=None) -> int:
    """Run; a ``FastgfnError`` (bad config or input, unusable checkpoint, full disk, too many
    non-finite steps) ends as one line ``fastgfn: <kind> error: ...`` and exit status 2."""
    args = parse_args(argv)
    if args.local_rank is not None and "LOCAL_RANK" not in os.environ:
        os.environ["LOCAL_RANK"] = str(args.local_rank)
    try:
        cfg = build_config(args)
        from fastgfn.trainer import Trainer

        Trainer(cfg).run()
    except FastgfnError as exc:
        message = "; ".join(line.strip() for line in str(exc).splitlines() if line.strip())
        print(f"fastgfn: {exc.kind} error: {message}", file=sys.stderr)
        return 2
    from fastgfn.trainer.engines.distributed import shutdown_distributed

    shutdown_distributed()
    return 0


if __name__ == "__main__":
    from fastgfn.trainer.engines.distributed import exit_rank

    code = main()
    exit_rank(code)  # a rank of a multi-process run ends here (see exit_rank)
    sys.exit(code)

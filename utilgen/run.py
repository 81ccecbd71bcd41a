"""``python -m utilgen.run``: the command line.

``--help`` answers without importing torch (argparse only); torch and the
extension load only for the work that needs them.
"""

from __future__ import annotations

import argparse
import sys


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="python -m utilgen.run",
        description=(
            "UtilGen: utility-centric generative data augmentation. "
            "This release provides the accelerated op layer; --info reports what runs here."
        ),
    )
    parser.add_argument(
        "--info",
        action="store_true",
        help="print versions, whether utilgen._C loaded (and why not), CUDA/Triton availability "
        "the backend each op would use and the generator's attention (xformers/SDPA), with the reasons",
    )
    parser.add_argument("--json", action="store_true", help="with --info: print the report as JSON")
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    if args.info:
        from utilgen import ops  # imports torch
        from utilgen.generator.attention import attention_info

        generator_attention = attention_info()
        if args.json:
            import json

            print(json.dumps({**ops.info(), "generator": {"attention": generator_attention}}, indent=2, default=str))
        else:
            print(ops.info_text())
            print(f"generator attention [{generator_attention['device']}]: auto -> {generator_attention['auto']} "
                  f"({generator_attention['reason']})")  # fmt: skip
        return 0
    print(
        "utilgen: the end-to-end UtilGen run (data, generator, TODV, MLCO, ILPO, evaluation) is not in "
        "this release yet; `python -m utilgen.run --info` reports the accelerated op layer.",
        file=sys.stderr,
    )
    return 2


if __name__ == "__main__":
    sys.exit(main())

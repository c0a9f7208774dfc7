"""Run the property tests of tests/test_properties.py with many more (random, not derandomized) examples.

    python tools/property_long.py --examples 500 [--seed S] [--minutes M] [--max-blocks B]
                                  [--property exact|identity|both]

Each property runs until ``--examples`` examples pass or ``--minutes`` is spent (whichever comes first); a failure
is shrunk by hypothesis and printed as the minimal falsifying Chain (paste it into a regular test to reproduce).
Exit code 0 when every property held, 1 when one failed.
"""
from __future__ import annotations

import argparse
import logging
import sys
import time
import traceback
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "tests"))

import test_properties as props
from hypothesis import given, seed, settings
from hypothesis import strategies as st


class _Budget(Exception):
    """Raised inside a test body once the time budget is spent, to stop generation early."""


def run_property(name: str, examples: int, minutes: float, rng_seed: int, max_blocks: int) -> tuple[bool, int, float]:
    """Run one property; return (held, examples run, seconds)."""
    deadline = time.monotonic() + 60 * minutes
    count = 0

    def tick() -> None:
        nonlocal count
        if time.monotonic() > deadline:
            raise _Budget
        count += 1

    def exact(chain: props.Chain) -> None:
        tick()
        props.check_exact(chain)

    def identity(chain: props.Chain, k: int) -> None:
        tick()
        props.check_identity(chain, k)

    if name == "exact":
        test = given(props.chains(max_blocks))(exact)
    else:
        test = given(props.chains(max_blocks), st.integers(1, 2 * max_blocks))(identity)
    cfg = settings(props.property_settings(examples, derandomize=False), print_blob=True)
    test = seed(rng_seed)(cfg(test))
    t0 = time.perf_counter()
    try:
        test()
    except _Budget:
        print(f"[{name}] time budget of {minutes} min spent")
    except Exception:  # noqa: BLE001 - report the minimal example hypothesis found, then go on with the next property
        traceback.print_exc()
        print(f"[{name}] FAILED after {count} examples ({time.perf_counter() - t0:.1f}s)")
        return False, count, time.perf_counter() - t0
    return True, count, time.perf_counter() - t0


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--examples", type=int, default=500, help="examples per property (default 500)")
    p.add_argument("--minutes", type=float, default=10.0, help="time budget per property (default 10)")
    p.add_argument("--seed", type=int, default=0, help="hypothesis seed (default 0)")
    p.add_argument("--max-blocks", type=int, default=6, help="longest chain, in blocks (default 6; the tests use 4)")
    p.add_argument("--property", choices=("exact", "identity", "both"), default="both")
    args = p.parse_args(argv)
    logging.disable(logging.WARNING)  # '--remove K: only N activations' warnings, one per example
    names = ["exact", "identity"] if args.property == "both" else [args.property]
    ok = True
    for name in names:
        held, count, seconds = run_property(name, args.examples, args.minutes, args.seed, args.max_blocks)
        print(f"[{name}] {'held' if held else 'FAILED'}: {count} examples in {seconds:.1f}s (seed {args.seed})")
        ok &= held
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())

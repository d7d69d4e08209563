"""Entry point of DDP ranks 1..n-1: `python -m loralab.cli.ddp_worker <run>/config.json` (see loralab.lightning.ddp).

The exact config rank 0 trains, handed over as a file, so extra ranks never re-run a sweep's command line.
"""
import json
import sys
from pathlib import Path

from loralab.config import to_config
from loralab.run.train import run


def main(argv: list[str] | None = None) -> None:
    path = Path((argv or sys.argv[1:])[0])
    run(to_config(json.loads(path.read_text())))


if __name__ == "__main__":
    main()

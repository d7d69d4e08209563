"""Entry point of DDP ranks 1..n-1: `python -m loralab.ddp_worker <run>/config.json` (see loralab.ddp)."""
from loralab.ddp import main

if __name__ == "__main__":
    main()

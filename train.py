"""Entry point: `python train.py task=mrpc lora.r=8`, or a sweep: `python train.py -m lora.r=4,8,16`."""
import os
import sys

# OpenMP threads that spin while waiting starve every other process on a small machine (parallel sweep jobs, DDP
# ranks, a second user): measured 2.8 vs 73 samples/s on 2 shared cores. Must be set before torch loads.
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

import hydra  # noqa: E402
from omegaconf import DictConfig  # noqa: E402

import loralab.config  # noqa: F401,E402  (registers the ${loralab.uid:} resolver used by conf/hydra)
from loralab.errors import Interrupted, LoralabError, report  # noqa: E402
from loralab.run.train import run, sweeping  # noqa: E402


@hydra.main(config_path="conf", config_name="config", version_base="1.3")
def main(cfg: DictConfig):
    try:
        return run(cfg)
    except Interrupted as e:  # a checkpoint was written: exit 128 + signal, the sweep stops (relaunch resumes)
        print(f"train.py: {e}", file=sys.stderr)
        raise
    except LoralabError as e:
        if sweeping():
            raise  # the sweeper records the job as failed and goes on with the others
        sys.exit(report("train.py", e))  # one line, no traceback: the message names the field and the fix


if __name__ == "__main__":
    main()

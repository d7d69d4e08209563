"""Entry point: `python train.py task=mrpc lora.r=8`, or a sweep: `python train.py -m lora.r=4,8,16`."""
import hydra
from omegaconf import DictConfig

import loralab.config  # noqa: F401  (registers the ${loralab.uid:} resolver used by conf/hydra)
from loralab.train import run


@hydra.main(config_path="conf", config_name="config", version_base="1.3")
def main(cfg: DictConfig):
    return run(cfg)


if __name__ == "__main__":
    main()

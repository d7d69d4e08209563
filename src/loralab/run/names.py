"""Layer and module names of transformer weights: the one parser of `<prefix>.<block>.<index>.<module>` names."""
from __future__ import annotations

import re

# The numbered blocks of BERT (`layer`), Llama/Mistral/Qwen (`layers`), GPT-2 (`h`) and ViT-style models (`blocks`).
_LAYER = re.compile(r"(?:^|\.)(?:layers?|h|blocks?)\.(\d+)\.(.+)$")


def split_layer(name: str) -> tuple[int | None, str]:
    """(layer index, module path after it) of a dotted name, e.g. `bert.encoder.layer.3.attention.self.query` ->
    (3, "attention.self.query"); (None, name) for a name outside the numbered blocks."""
    m = _LAYER.search(name)
    return (int(m[1]), m[2]) if m else (None, name)

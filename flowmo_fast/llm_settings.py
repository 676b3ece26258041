"""The settings of the `qwen2.5-coder-0.5b[_span_P]` quantization type that a config needs (the type's names,
its span fraction, the FIM marker ids, the LLM's default path) and their checks: a leaf module (no torch, no
transformers), so `flowmo_fast.config` reads them without `flowmo_fast.flowmo.llm_infill`, the LLM's runtime."""

from __future__ import annotations

import ast
from dataclasses import dataclass
from typing import Optional, Sequence, Union

LLM_QUANTIZATION = "qwen2.5-coder-0.5b"
SPAN_FORM = f"{LLM_QUANTIZATION}_span_P"
DEFAULT_SPAN_FRACTION = 0.3
DEFAULT_LLM_PATH = "Qwen/Qwen2.5-Coder-0.5B"


@dataclass(frozen=True)
class FimIds:
    """The fill-in-the-middle marker token ids."""

    prefix: int
    middle: int
    suffix: int


QWEN_CODER_FIM_IDS = FimIds(prefix=151659, middle=151660, suffix=151661)


@dataclass(frozen=True)
class LLMQuantization:
    """A parsed `qwen2.5-coder-0.5b[_span_P]`: the fraction P of the code the LLM infills."""

    span_fraction: float = DEFAULT_SPAN_FRACTION

    def span_length(self, code_length: int) -> int:
        """n = int(P * code_length) code tokens infilled."""
        return int(self.span_fraction * code_length)


def is_llm_quantization(quantization_type: str) -> bool:
    """True for `qwen2.5-coder-0.5b` and anything `qwen2.5-coder-0.5b_...` (checked by parse_llm_quantization)."""
    return quantization_type == LLM_QUANTIZATION or quantization_type.startswith(f"{LLM_QUANTIZATION}_")


def parse_llm_quantization(quantization_type: str) -> LLMQuantization:
    """`qwen2.5-coder-0.5b` -> P = 0.3; `qwen2.5-coder-0.5b_span_P` -> P in (0, 1]."""
    if quantization_type == LLM_QUANTIZATION:
        return LLMQuantization()
    prefix = f"{LLM_QUANTIZATION}_span_"
    if quantization_type.startswith(prefix):
        try:
            fraction = float(quantization_type[len(prefix):])
        except ValueError:
            fraction = float("nan")
        if 0 < fraction <= 1:
            return LLMQuantization(fraction)
    raise ValueError(
        f"model.quantization_type={quantization_type!r}; allowed LLM forms: {LLM_QUANTIZATION} (span fraction "
        f"{DEFAULT_SPAN_FRACTION}) or {SPAN_FORM} with 0 < P <= 1, e.g. {LLM_QUANTIZATION}_span_0.6"
    )


def parse_fim_ids(value: Union[str, Sequence[int], None]) -> Optional[FimIds]:
    """`model.llm_fim_ids`: "prefix,middle,suffix" (or a 3-sequence) -> FimIds; None or "" -> None."""
    if value is None or (isinstance(value, str) and value.strip().lower() in ("", "none", "null")):
        return None
    ids = value
    if isinstance(value, str):
        text = value.strip()
        try:
            ids = ast.literal_eval(text if text[0] in "([" else f"({text})")
        except (ValueError, SyntaxError):
            ids = None
    if not (isinstance(ids, (tuple, list)) and len(ids) == 3 and all(isinstance(i, int) and i >= 0 for i in ids)):
        raise ValueError(
            f"model.llm_fim_ids={value!r}: expected three token ids 'prefix,middle,suffix' such as "
            f"'{QWEN_CODER_FIM_IDS.prefix},{QWEN_CODER_FIM_IDS.middle},{QWEN_CODER_FIM_IDS.suffix}', or None"
        )
    return FimIds(*ids)

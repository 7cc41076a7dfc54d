"""Names of the eval stage's figures, declared once: the stage writes them, the report and `posttrain eval` read them.

Per model: ``<label>_<figure>`` (e.g. ``final_prompt_loose``), for the labels of ``MODELS``. Per comparison with
the starting policy: ``<comparison>_<accuracy>_gain`` and its interval ``..._gain_ci_low`` / ``..._gain_ci_high``
(e.g. ``final_vs_start_prompt_loose_gain``), a paired bootstrap over prompts.
"""

from __future__ import annotations

ACCURACIES = ("prompt_strict", "prompt_loose", "instruction_strict", "instruction_loose")
"""IFEval's four accuracies: prompt-level (every instruction of a prompt followed) and instruction-level, each
strict (the response as written) and loose (also after dropping its first/last line or its `*` markup)."""
FIGURES = (*ACCURACIES, "truncated_fraction", "mean_tokens")
"""Figures of one model: the accuracies, the fraction of responses cut by the token limit (finish reason
"length"), and the mean response length in tokens."""
SUMMARY_KEYS = ("benchmark", "model", "n", *FIGURES)
"""Keys of one model's summary: the JSON line of `posttrain eval --json`."""

START, SFT, FINAL = "start", "sft", "final"
MODELS = (START, SFT, FINAL)
"""Labels of the models the stage evaluates: the starting policy, the SFT model, the final (DPO) model."""
COMPARISONS = {"sft_vs_start": (SFT, START), "final_vs_start": (FINAL, START)}
"""Comparison name -> (model, baseline): paired differences reported with their confidence interval."""


def figure_key(model: str, figure: str) -> str:
    """Manifest key of one model's figure, e.g. ``final_prompt_loose``."""
    return f"{model}_{figure}"


def gain_keys(comparison: str, accuracy: str) -> tuple[str, str, str]:
    """Manifest keys of a paired difference and its interval, e.g. ``final_vs_start_prompt_loose_gain``,
    ``..._gain_ci_low``, ``..._gain_ci_high``."""
    base = f"{comparison}_{accuracy}_gain"
    return base, f"{base}_ci_low", f"{base}_ci_high"


MODE_FOLLOWED = "mode_followed"
"""Per mode: the fraction of the mode's benchmark answers that are in the mode (reasoning for think, none for
no_think)."""


def mode_figure_key(model: str, mode: str, figure: str) -> str:
    """Manifest key of one model's figure in one thinking mode, e.g. ``sft_think_prompt_loose``,
    ``final_no_think_mean_tokens``, ``sft_think_mode_followed``."""
    return f"{model}_{mode}_{figure}"


def switch_rate_key(model: str, mode: str) -> str:
    """Manifest key of a model's switch-following rate: the fraction of held-out prompts asked with ``/think`` (or
    ``/no_think``) whose answer has reasoning (or none), e.g. ``sft_switch_no_think_rate``."""
    return f"{model}_switch_{mode}_rate"


MODEL_KEYS = tuple(figure_key(m, f) for m in MODELS for f in FIGURES)
GAIN_KEYS = tuple(k for c in COMPARISONS for a in ACCURACIES for k in gain_keys(c, a))
FINAL_VS_START_PROMPT_LOOSE_GAIN, FINAL_VS_START_PROMPT_LOOSE_GAIN_CI_LOW, FINAL_VS_START_PROMPT_LOOSE_GAIN_CI_HIGH = \
    gain_keys("final_vs_start", "prompt_loose")
SFT_VS_START_PROMPT_LOOSE_GAIN, SFT_VS_START_PROMPT_LOOSE_GAIN_CI_LOW, SFT_VS_START_PROMPT_LOOSE_GAIN_CI_HIGH = \
    gain_keys("sft_vs_start", "prompt_loose")

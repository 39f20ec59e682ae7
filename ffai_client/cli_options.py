"""Sampling flags shared by `ffai` and `ffai-worker generate` (one definition, two CLIs)."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, TypeVar

import click

from ffai_client.types import GenerationParameters

F = TypeVar("F", bound=Callable[..., Any])

_SAMPLING_OPTIONS = [
    click.option(
        "--max-tokens", type=int, default=256, show_default=True, help="Tokens to generate at most."
    ),
    click.option(
        "--temperature",
        type=float,
        default=None,
        help="0 = greedy; default: the model's, else 0.6.",
    ),
    click.option(
        "--top-p",
        type=float,
        default=1.0,
        show_default=True,
        help="Sample from the smallest set of tokens whose probabilities add up to this.",
    ),
    click.option(
        "--top-k",
        type=int,
        default=0,
        show_default=True,
        help="Sample from the K likeliest tokens only; 0 disables.",
    ),
    click.option(
        "--min-p",
        type=float,
        default=0.0,
        show_default=True,
        help="Drop tokens less likely than this fraction of the likeliest; 0 disables.",
    ),
    click.option(
        "--repetition-penalty",
        type=float,
        default=1.0,
        show_default=True,
        help="Make tokens of the recent text less likely by this factor (HF); 1 disables.",
    ),
    click.option(
        "--presence-penalty",
        type=float,
        default=0.0,
        show_default=True,
        help="Subtract this from the logit of each token generated so far; 0 disables.",
    ),
    click.option(
        "--frequency-penalty",
        type=float,
        default=0.0,
        show_default=True,
        help="Subtract this times its count from each generated token's logit; 0 disables.",
    ),
    click.option("--seed", type=int, default=None, help="Same seed, same tokens."),
    click.option("--stop", multiple=True, help="Stop string (repeatable); never printed."),
    click.option("--ignore-eos", is_flag=True, help="Keep going past the end-of-sequence token."),
]


def sampling_options(func: F) -> F:
    """Add the sampling flags to a click command."""
    for option in reversed(_SAMPLING_OPTIONS):
        func = option(func)
    return func


def parameters_from_options(options: dict[str, Any]) -> GenerationParameters:
    """Build GenerationParameters from the flags; raises click.BadParameter on bad values."""
    try:
        return GenerationParameters(
            max_tokens=options["max_tokens"],
            temperature=options["temperature"],
            top_p=options["top_p"],
            top_k=options["top_k"],
            min_p=options["min_p"],
            repetition_penalty=options["repetition_penalty"],
            presence_penalty=options["presence_penalty"],
            frequency_penalty=options["frequency_penalty"],
            seed=options["seed"],
            stop=list(options["stop"]),
            stop_on_eos=not options["ignore_eos"],
        )
    except ValueError as exc:
        raise click.BadParameter(str(exc)) from None


SAMPLING_KEYS = (
    "max_tokens",
    "temperature",
    "top_p",
    "top_k",
    "min_p",
    "repetition_penalty",
    "presence_penalty",
    "frequency_penalty",
    "seed",
    "stop",
    "ignore_eos",
)

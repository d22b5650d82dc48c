"""The diffusion sampler's settings: what each is, its bounds, and where it comes from.

``SamplerParams`` holds them, named as in transformers. ``SamplerParams.resolve``
reads the checkpoint's generation_config.json, then ``FAST`` if asked, then the
caller's overrides; that happens once, at the edge (a command line, a server
request, a library call given keywords), and the resolved settings travel
down from there. The command lines and the server build and check their
flags and fields from the same schema (``SETTING_INFO``, ``check_setting``).
"""

import math
import numbers
from dataclasses import asdict, dataclass, field, fields, replace
from typing import Any, Dict, List, Optional

from . import sampler
from .config import eos_token_ids, pad_token_id
from .model import Model


def _setting(default, kind, minimum, help: str, metavar: str, inclusive: bool = True, maximum=None):
    """A sampler setting: its default, type, bounds and help text.

    The command lines build their flags from these, so a setting is defined,
    checked and documented in one place.
    """
    return field(
        default=default,
        metadata=dict(kind=kind, minimum=minimum, maximum=maximum, inclusive=inclusive, help=help, metavar=metavar),
    )


@dataclass
class SamplerParams:
    """The diffusion sampler's settings, named as in transformers.

    The defaults are the reference's, used where the checkpoint's
    generation_config.json leaves a value unset (transformers writes nulls).
    ``resolve`` builds them for a model; built directly, the end-of-sequence
    and pad ids left None are the model's, filled in by ``for_model``.
    """

    max_denoising_steps: int = _setting(
        48, int, 1, "Most denoising steps per canvas; a canvas stops earlier once stable and confident.", "N"
    )
    entropy_bound: float = _setting(
        0.1, float, 0.0, "Entropy budget (nats) for the tokens accepted at each step.", "NATS", inclusive=False
    )
    t_min: float = _setting(0.4, float, 0.0, "Temperature at the last step of a canvas.", "T")
    t_max: float = _setting(
        0.8, float, 0.0, "Temperature at the first step of a canvas (above --t-min).", "T", inclusive=False
    )
    stability_threshold: int = _setting(
        1, int, 0, "Steps the argmax canvas must stay unchanged before it can stop.", "N"
    )
    confidence_threshold: float = _setting(
        0.005, float, 0.0, "Mean entropy (nats) below which a stable canvas stops.", "NATS", inclusive=False
    )
    # Opt-in departures from the reference: their defaults leave it exact.
    self_conditioning_top_k: int = _setting(
        0,
        int,
        0,
        "Self-condition each step on the K most likely tokens of the last one instead of the whole "
        "vocabulary; departs from the reference (0: the whole vocabulary, as the reference).",
        "K",
    )
    accept_threshold: float = _setting(
        0.0,
        float,
        0.0,
        "Also accept every position whose most likely token has at least this probability "
        "(confidence-threshold parallel decoding); departs from the reference (0: the entropy bound alone).",
        "P",
        maximum=1.0,
    )
    commit_after: int = _setting(
        0,
        int,
        0,
        "Commit a position once it is accepted, its argmax has not changed for N steps and its entropy "
        "is under --confidence-threshold (the stop rule, per position): it keeps that token for the rest "
        "of the canvas; departs from the reference (0: never, every position is resampled each step).",
        "N",
    )
    reuse_committed: int = _setting(
        0,
        int,
        0,
        "With commit_after: for up to N steps in a row, run the decoder over the uncommitted positions "
        "only, the committed ones keeping the states they had when last computed (an approximate step), "
        "then one full pass; departs from the reference (0: every position every step).",
        "N",
    )
    eos_token_id: Optional[List[int]] = None  # None: the model's
    pad_token_id: Optional[int] = None  # None: the model's

    @classmethod
    def resolve(cls, model: Model, fast: bool = False, **overrides) -> "SamplerParams":
        """Defaults from the checkpoint's generation config, then ``FAST`` if
        ``fast``, then ``overrides``."""
        if fast:
            overrides = {**FAST, **{k: v for k, v in overrides.items() if v is not None}}
        gen = model.generation_config
        sampler_config = gen.get("sampler_config") or {}
        values = asdict(cls())
        for name in values:
            source = sampler_config if name == "entropy_bound" else gen
            if source.get(name) is not None:
                values[name] = source[name]
        values["eos_token_id"] = eos_token_ids(gen, model.args)
        values["pad_token_id"] = pad_token_id(gen, model.args)
        for name in SAMPLER_SETTINGS:
            if name not in overrides or overrides[name] is None:
                try:
                    values[name] = check_setting(name, values[name])
                except (TypeError, ValueError) as e:
                    raise ValueError(f"the checkpoint's generation_config.json: {e}") from None
        for name, value in overrides.items():
            if name not in values:
                raise TypeError(f"unknown generation parameter {name!r}")
            if value is not None:
                values[name] = check_setting(name, value) if name in SAMPLER_SETTINGS else value
        params = cls(**values)
        params.validate(model)
        return params

    def for_model(self, model: Model) -> "SamplerParams":
        """These settings checked for ``model``, its end-of-sequence and pad
        ids where they are None: what an entry point given them runs with."""
        params = self
        if self.eos_token_id is None or self.pad_token_id is None:
            gen = model.generation_config
            params = replace(
                self,
                eos_token_id=eos_token_ids(gen, model.args) if self.eos_token_id is None else self.eos_token_id,
                pad_token_id=pad_token_id(gen, model.args) if self.pad_token_id is None else self.pad_token_id,
            )
        for name in SAMPLER_SETTINGS:
            check_setting(name, getattr(params, name))
        params.validate(model)
        return params

    def validate(self, model: Model):
        """What no single setting can check alone."""
        if self.t_max <= self.t_min:
            raise ValueError(f"t_max must be greater than t_min (got t_max={self.t_max}, t_min={self.t_min})")
        if self.reuse_committed and not self.commit_after:
            raise ValueError("reuse_committed needs commit_after: only committed positions can be reused")
        if self.self_conditioning_top_k > model.args.vocab_size:
            raise ValueError(
                f"self_conditioning_top_k must be at most the vocabulary size {model.args.vocab_size} "
                f"(got {self.self_conditioning_top_k})"
            )

    def temperature(self, step: int) -> float:
        """The temperature of a canvas' ``step``-th step (from 1)."""
        # The reference counts its steps down, N at the first and 1 at the last.
        N = self.max_denoising_steps
        return sampler.temperature(N - step + 1, N, self.t_min, self.t_max)


def sampler_params(model: Model, params: Optional[SamplerParams], settings: Dict[str, Any]) -> SamplerParams:
    """What a library entry point runs with: ``params`` as its caller resolved
    them, or keyword ``settings`` resolved here (``SamplerParams.resolve``);
    not both. Entry points pass the result down, so nothing resolves twice."""
    if params is None:
        return SamplerParams.resolve(model, **settings)
    if not isinstance(params, SamplerParams):
        raise TypeError(f"params must be a SamplerParams (got {type(params).__name__})")
    if settings:
        raise TypeError(
            f"give the sampler settings in params or as keywords, not both (got params and {', '.join(settings)})"
        )
    return params.for_model(model)


# The ``fast`` setting: what docs/benchmarks.md measured to cut the work per
# committed token most for the least accuracy on the trained model: a canvas
# stops at its first confident step (1.2 steps a canvas there, not 2.0, for
# 1 point of 200 problems), and self-conditioning reads 8 gathered rows per
# position instead of a product over the vocabulary (no accuracy lost; 13x
# cheaper at mini's widths). It departs from the reference sampler; the
# defaults stay the reference's.
FAST = dict(stability_threshold=0, self_conditioning_top_k=8)

SAMPLER_SETTINGS = tuple(f.name for f in fields(SamplerParams) if "help" in f.metadata)
SETTING_INFO = {f.name: dict(f.metadata, default=f.default) for f in fields(SamplerParams) if "help" in f.metadata}


def setting_problem(name: str, value) -> Optional[str]:
    """What is wrong with ``value`` for setting ``name`` (None: nothing), in a
    phrase that reads after the setting's name: "must be > 0 (got 0)"."""
    info = SETTING_INFO[name]
    minimum, inclusive = info["minimum"], info["inclusive"]
    shown = f"{value:g}" if isinstance(value, float) else str(value)
    if not math.isfinite(value):
        return f"must be a finite number (got {shown})"
    if value < minimum or (value == minimum and not inclusive):
        return f"must be {'>=' if inclusive else '>'} {minimum:g} (got {shown})"
    if info["maximum"] is not None and value > info["maximum"]:
        return f"must be <= {info['maximum']:g} (got {shown})"
    return None


def check_setting(name: str, value):
    """``value`` as setting ``name`` takes it; TypeError or ValueError naming the setting."""
    kind = SETTING_INFO[name]["kind"]
    if isinstance(value, bool) or not isinstance(value, numbers.Real):
        raise TypeError(f"{name} must be {'an integer' if kind is int else 'a number'} (got {value!r})")
    if kind is int:
        if not isinstance(value, numbers.Integral):
            raise TypeError(f"{name} must be an integer (got {value!r})")
        value = int(value)
    else:
        value = float(value)
    problem = setting_problem(name, value)
    if problem:
        raise ValueError(f"{name} {problem}")
    return value

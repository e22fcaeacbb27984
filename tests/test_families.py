"""The family registry: one entry per family, its modules where the layers say, its input schema
checked by table (``Family.resolve``: what ``Pipeline.generate`` does with its arguments)."""

from __future__ import annotations

import numpy as np
import pytest

from clusca_trt.errors import ConfigError, InputError
from clusca_trt.families import DIT, FAMILIES, FLUX, HUNYUAN_VIDEO, MODELS, cli_fields, family
from clusca_trt.fields import MAX_SAMPLES, Field

DIT_FACTS = {"num_classes": 10, "latent_shape": [1, 32, 32]}
FLUX_FACTS = {"default_steps": 4, "text_length": 16}


@pytest.mark.parametrize("fam", FAMILIES.values(), ids=lambda f: f.name)
def test_each_family_names_modules_of_its_layers_that_implement_it(fam):
    assert fam.model_module.startswith("clusca_trt.models.") and fam.runtime_module.startswith("clusca_trt.runtime.")
    assert MODELS == "clusca_trt.models"
    model, runtime = fam.model(), fam.runtime()
    assert callable(model.load) and callable(model.model_names) and model.model_names()
    assert callable(runtime.generate)
    assert fam.primary.cli and fam.primary.kind in ("labels", "prompts")


def test_unknown_families_are_refused_in_one_line():
    with pytest.raises(ConfigError, match="model family must be one of dit, flux, hunyuan-video, got 'subprocess'"):
        family("subprocess")


@pytest.mark.parametrize("fam, args, kwargs, facts, want", [
    (DIT, ([3, 1],), {}, DIT_FACTS, {"class_labels": [3, 1], "seed": 0, "steps": 50, "sampler": "ddim",
                                     "cfg_scale": 1.5, "keys": None, "progress": None}),
    (DIT, (), {"class_labels": np.array([2]), "seed": 5, "steps": 8, "sampler": "ddpm", "cfg_scale": 4},
     DIT_FACTS, {"class_labels": [2], "seed": 5, "steps": 8, "sampler": "ddpm", "cfg_scale": 4.0}),
    (FLUX, ("a cat",), {}, FLUX_FACTS, {"prompt": ["a cat"], "steps": 4, "guidance_scale": 3.5,
                                       "text_propagation": 0.0, "prompt_embeds": None}),
    (FLUX, (), {"prompt": ["a", "b"], "steps": 6}, {"text_length": 16}, {"prompt": ["a", "b"], "steps": 6}),
    (FLUX, (), {"prompt": "a"}, {"text_length": 16}, {"steps": 50}),  # no fact: the family's default
    (HUNYUAN_VIDEO, ("a cat",), {}, {}, {"guidance_scale": 6.0, "steps": 50}),
])
def test_resolve_fills_the_family_defaults(fam, args, kwargs, facts, want):
    got = fam.resolve(args, kwargs, facts)
    assert set(got) == {f.name for f in fam.fields}
    for k, v in want.items():
        assert got[k] == v, k


@pytest.mark.parametrize("fam, args, kwargs, error, message", [
    (DIT, ([1], 1.5, 5), {}, InputError, "generate takes one positional argument (class_labels), got 3"),
    (DIT, ([1],), {"class_labels": [2]}, InputError, "class_labels given twice"),
    (DIT, (), {"seed": 1}, InputError, "expected class_labels for a dit model, got none"),
    (DIT, ([1],), {"prompt": "a"}, InputError, "unknown argument 'prompt' for a dit model; expected some of seed"),
    (DIT, ([1],), {"seed": -1}, InputError, "seed must be an integer in 0..9223372036854775807, got -1"),
    (DIT, ([1],), {"seed": True}, InputError, "seed must be an integer"),
    (DIT, ([1],), {"steps": 0}, ConfigError, "steps must be an integer in 1..10000, got 0"),
    (DIT, ([1],), {"sampler": "euler"}, ConfigError, "sampler must be one of ddim, ddpm, got 'euler'"),
    (DIT, ([1],), {"cfg_scale": float("nan")}, InputError, "cfg_scale must be a finite number, got nan"),
    (DIT, ([1],), {"cfg_scale": "2"}, InputError, "cfg_scale must be a finite number, got '2'"),
    (DIT, ([10],), {}, InputError, "class labels must be in 0..9, got 10"),
    (DIT, ([1.0],), {}, InputError, "expected integer class labels, got 1.0 (float)"),
    (DIT, ("1",), {}, InputError, "expected class labels as a list of integers, got str '1'"),
    (DIT, ([0] * (MAX_SAMPLES + 1),), {}, InputError, f"expected at most {MAX_SAMPLES} class labels"),
    (DIT, ([1],), {"keys": [(0, 2**31 - 1)]}, InputError, "keys: sample index must be an integer in 0..99999"),
    (DIT, ([1],), {"keys": [(0, True)]}, InputError, "keys: expected (seed, index) pairs of integers"),
    (DIT, ([1],), {"progress": 3}, InputError, "progress must be callable, got int"),
    (FLUX, (7,), {}, InputError, "expected a prompt string or a non-empty list of them, got 7"),
    (FLUX, ("a \ud800 cat",), {}, InputError, "prompt 0: expected text encodable as UTF-8, got a lone surrogate"),
    (FLUX, ("a",), {"text_propagation": 1.5}, ConfigError,
     "text_propagation must be a finite number in [0.0, 1.0], got 1.5"),
    (FLUX, (), {"prompt_embeds": np.full((1, 2), np.inf)}, InputError, "prompt_embeds: expected finite values"),
    (FLUX, (), {"prompt_embeds": "x"}, InputError, "prompt_embeds: expected a numeric array, got dtype <U1"),
    (FLUX, ("a",), {"encoders": 3}, InputError, "encoders must be a folder path, got int"),
])
def test_resolve_refuses_bad_inputs_in_one_line(fam, args, kwargs, error, message):
    with pytest.raises(error) as e:
        fam.resolve(args, kwargs, DIT_FACTS)
    assert message in str(e.value) and "\n" not in str(e.value)


def test_the_cli_options_come_from_the_schema():
    fields = cli_fields()
    assert fields["class_labels"].cli == ("--class-labels",) and fields["prompt"].cli == ("--prompt", "-p")
    assert fields["guidance_scale"].cli == ("--guidance",)
    assert "prompt_embeds" not in fields and "encoders" not in fields  # library and HTTP only


def test_a_field_of_an_unknown_kind_is_refused():
    with pytest.raises(ConfigError, match="field kind must be one of"):
        Field("x", "complex", "")

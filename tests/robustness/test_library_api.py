"""Issue 20, case 5: the Python API is as strict as the CLI and the server. ``generate`` after
``close()``, positional arguments past the first, sample keys whose noise costs more than the
samples (bounded by the sample size, not only by the index), ``Pipeline.load``'s own arguments
of the wrong type, ClusCa settings of the wrong type, FLUX prompts that are not text: each is a
one-line typed error before any work, never a traceback or a silent misreading."""

from __future__ import annotations

import numpy as np
import pytest

from clusca_trt.errors import ClusCaError, ConfigError, EngineError, InputError
from clusca_trt.runtime.pipeline import Pipeline

from .conftest import one_line


@pytest.fixture(scope="module")
def pipe(micro):
    with Pipeline.load(micro[2].directory) as p:
        yield p


@pytest.fixture
def no_sampling(monkeypatch):
    """Fails the test if any family starts sampling."""
    import clusca_trt.runtime.diffusers_common as common
    import clusca_trt.runtime.dit as dit

    def refuse(*a, **k):
        raise AssertionError("sampling started")

    monkeypatch.setattr(dit, "sample", refuse)
    monkeypatch.setattr(common.FlowMatchingRuntime, "sample", refuse)


def test_generate_after_close_is_one_line(micro):
    p = Pipeline.load(micro[2].directory)
    p.close()
    with pytest.raises(EngineError) as e:
        p.generate([1], steps=2)
    assert "this Pipeline is closed" in one_line(e)
    p.close()  # twice: harmless


@pytest.mark.parametrize("args, message", [
    (([1], 1.5, 5), "generate takes one positional argument (class_labels), got 3"),
    (([1], 7), "generate takes one positional argument (class_labels), got 2"),
])
def test_positional_arguments_past_the_first_are_refused(pipe, no_sampling, args, message):
    with pytest.raises(InputError) as e:
        pipe.generate(*args, steps=2)
    assert message in one_line(e)


@pytest.mark.parametrize("keys, error, message", [
    ([(0, 2**31 - 1)], InputError, "keys: sample index must be an integer in 0..99999, got 2147483647"),
    ([(0, 300_000)], InputError, "keys: sample index must be an integer in 0..99999, got 300000"),
    # within the index range, but 99999 samples of noise drawn for one (25.6 M values of the micro DiT's 256)
    ([(0, 99_999)], InputError, "keys: sample index 99999 of seed 0 needs the noise of the 99999 samples before it"),
    ([(3, 70_000), (4, 70_000)], InputError, "expected at most 16777216 noise values"),
])
def test_sample_keys_are_bounded_by_what_their_noise_costs(pipe, no_sampling, keys, error, message):
    with pytest.raises(error) as e:
        pipe.generate([1] * len(keys), keys=keys, steps=2)
    assert message in one_line(e)


def test_a_key_is_the_sample_of_its_seed_and_index(pipe):
    """What the bound keeps: (seed, j) is sample j of ``seed``, and many samples of one seed are free."""
    many = pipe.generate([1] * 4, seed=5, steps=3).latents
    one = pipe.generate([1], keys=[(5, 3)], steps=3).latents
    np.testing.assert_array_equal(one[0], many[3])


@pytest.mark.parametrize("shape, index, refused", [
    ((4, 8, 8), 65_536, False),  # 65536 samples before it x 256 values: the budget exactly
    ((4, 8, 8), 65_537, True),
    ((4096, 64), 64, False),  # a FLUX 1024 px latent: 64 samples before it are the budget
    ((4096, 64), 65, True),
    ((1, 32, 32), 99_999, True),  # dit-digits: the 7 s case scaled down
])
def test_the_noise_bound_is_the_values_drawn_for_nothing(shape, index, refused):
    from clusca_trt.runtime.denoiser import check_noise_cost

    if refused:
        with pytest.raises(InputError, match="use smaller indices"):
            check_noise_cost([(0, index)], shape)
    else:
        check_noise_cost([(0, index)], shape)
    check_noise_cost([(0, j) for j in range(index + 1)], shape)  # every sample asked for: nothing wasted


@pytest.mark.parametrize("kwargs, message", [
    ({"threads": 1.5}, "threads must be None or an integer in 1..4096, got 1.5"),
    ({"threads": 0}, "threads must be None or an integer in 1..4096, got 0"),
    ({"threads": True}, "threads must be None or an integer in 1..4096, got True"),
    ({"threads": "2"}, "threads must be None or an integer in 1..4096, got '2'"),
    ({"select": "128"}, "select must be a dict of build options (e.g. {'height': 768}), got str '128'"),
    ({"select": [128]}, "select must be a dict of build options"),
    ({"select": {1: 2}}, "select must map option names to integers (e.g. {'height': 768}), got 1: 2"),
    ({"select": {"height": "128"}}, "select must map option names to integers"),
    ({"verify": "no"}, "verify must be True or False, got 'no'"),
])
def test_pipeline_load_checks_its_arguments(micro, kwargs, message):
    with pytest.raises(ConfigError) as e:
        Pipeline.load(micro[2].directory, **kwargs)
    assert message in one_line(e)


@pytest.mark.parametrize("directory", [3, None, b"/tmp"])
def test_pipeline_load_checks_the_directory_type(directory):
    with pytest.raises(ConfigError) as e:
        Pipeline.load(directory)
    assert "directory must be a path (str or os.PathLike)" in one_line(e)


@pytest.mark.parametrize("kwargs, message", [
    ({"order": "2"}, "order must be an integer >= 0, got '2'"),
    ({"order": 1.5}, "order must be an integer >= 0, got 1.5"),
    ({"clusters": "2"}, "clusters must be an integer >= 0, got '2'"),
    ({"clusters": True}, "clusters must be an integer >= 0, got True"),
    ({"clusters": 2.0}, "clusters must be an integer >= 0, got 2.0"),
])
def test_clusca_settings_are_checked_by_type(pipe, no_sampling, kwargs, message):
    with pytest.raises(ConfigError) as e:
        pipe.generate([1], steps=2, **kwargs)
    assert message in one_line(e)


@pytest.fixture(scope="module")
def flux_pipe():
    """The tiny FLUX (random weights) run by PyTorch: no export, no encoders needed for these checks."""
    from clusca_trt.models import load_model
    from clusca_trt.spec import BuildOptions

    adapter = load_model("flux-tiny", random_init=True, seed=0).adapter
    return Pipeline.from_adapter(adapter, adapter.export_spec(BuildOptions(batch=1, clusters=2, order=1,
                                                                             kmeans_iterations=2)))


@pytest.mark.parametrize("prompt, message", [
    (5, "expected a prompt string or a non-empty list of them, got 5"),
    ([5], "expected a prompt string or a non-empty list of them, got [5]"),
    (["a cat", None], "expected a prompt string or a non-empty list of them"),
    ([], "expected a prompt string or a non-empty list of them, got []"),
    (b"a cat", "expected a prompt string or a non-empty list of them, got b'a cat'"),
    ("a \ud800 cat", "prompt 0: expected text encodable as UTF-8, got a lone surrogate"),
    (["fine", "\udfff"], "prompt 1: expected text encodable as UTF-8, got a lone surrogate"),
])
def test_flux_prompts_must_be_text(flux_pipe, no_sampling, prompt, message):
    for call in (lambda: flux_pipe.generate(prompt, steps=2), lambda: flux_pipe.generate(prompt=prompt, steps=2)):
        with pytest.raises(InputError) as e:
            call()
        assert message in one_line(e)


def test_every_refusal_of_the_api_is_a_clusca_error():
    assert all(issubclass(e, ClusCaError) for e in (ConfigError, EngineError, InputError))

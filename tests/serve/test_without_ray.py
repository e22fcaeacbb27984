"""The server's request checks, batching arguments and replica work, without Ray: a batch of requests
run by ``EngineWorker`` equals each request's ``Pipeline.generate`` alone (DiT and FLUX)."""

import asyncio
import dataclasses
import io
import json

import numpy as np
import pytest

from clusca_trt.config import ClusCaConfig
from clusca_trt.errors import ConfigError, InputError
from clusca_trt.runtime.pipeline import GenerateResult, Pipeline
from clusca_trt.runtime.output import result_bytes
from clusca_trt.errors import one_line
from clusca_trt.serve.proxy import error_body
from clusca_trt.serve.protocol import (ModelInfo, batch_arguments, page_form, parse_compare,
                                      parse_request, warmup_requests)
from clusca_trt.serve.server import ServeOptions
from clusca_trt.serve.worker import EngineWorker

TOL = 1e-5


def rel_err(a, b):
    return float(np.abs(a - b).max() / np.abs(b).max())


@pytest.fixture(scope="module")
def dit_info(engines_k4):
    return ModelInfo.from_manifest(engines_k4)


def parse(body, info, max_samples=8):
    return parse_request(json.dumps(body).encode(), info, max_samples)


def test_settings_resolve_like_the_pipeline(dit_info, engines_k4):
    """Left out or given as the default: one key; the config is the one Pipeline.generate resolves."""
    a = parse({"class_labels": [1], "seed": 3}, dit_info)
    b = parse({"class_labels": [2, 3], "seed": 9, "interval": 5, "method": "clusca"}, dit_info)
    c = parse({"class_labels": [1], "method": "fora"}, dit_info)
    assert a.key == b.key and a.key != c.key
    pipe = Pipeline.load(engines_k4.directory)
    assert a.config == pipe.resolve_config("clusca")
    assert c.config == pipe.resolve_config("fora") and c.config.order == 0
    assert a.steps == 50 and dict(a.sampling) == {"sampler": "ddim", "cfg_scale": 1.5}
    # resolving the resolved settings again gives the same config (what a batch run passes)
    args = batch_arguments([a, b])
    assert pipe.resolve_config(args["method"], args["interval"], args["propagation"], args["order"],
                               args["warmup"], args["fresh"]) == a.config
    assert args["class_labels"] == [1, 2, 3] and args["keys"] == [(3, 0), (9, 0), (9, 1)]


@pytest.mark.parametrize("body, message", [
    ({"class_labels": [1], "seed": True}, "seed: expected an integer, got true"),
    ({"class_labels": [1], "steps": 10.0}, "steps: expected an integer, got 10.0"),
    ({"class_labels": [1], "steps": 1001}, "steps: expected an integer 1..1000, got 1001"),
    ({"class_labels": [1], "seed": -1}, "seed: expected an integer 0.."),
    ({"class_labels": [False]}, "class_labels: expected a list of integers"),
    ({"class_labels": "1"}, "class_labels: expected a list of integers"),
    ({"class_labels": []}, "expected at least one class label"),
    ({"class_labels": [10]}, "class labels must be in 0..9, got 10"),
    ({"class_labels": list(range(9))}, "expected at most 8 samples per request, got 9"),
    ({"seed": 1}, "expected class_labels"),
    ({"class_labels": [1], "prompt": "a cat"}, "unknown field 'prompt' for a dit model"),
    ({"class_labels": [1], "method": "magic"}, "method: expected one of clusca, taylorseer, fora, full"),
    ({"class_labels": [1], "propagation": 1.5}, "propagation: expected a finite number in [0.0, 1.0], got 1.5"),
    ({"class_labels": [1], "cfg_scale": "2"}, "cfg_scale: expected a number"),
    ({"class_labels": [1], "sampler": "euler"}, "sampler: expected one of ddim, ddpm"),
    ({"class_labels": [1], "method": "taylorseer", "order": 0}, "taylorseer needs order >= 1"),
    ({"class_labels": [1], "order": 3}, "order must be <= the built Taylor order 2"),
    ({"class_labels": [1], "method": "full", "interval": 3}, "method full runs every step"),
    ({"class_labels": [1], "format": "png"}, "format png needs a model with a decoder"),
    ({"class_labels": [1], "format": "jpeg"}, "format: expected one of npz, png"),
])
def test_bad_requests_say_what_is_wrong_in_one_line(dit_info, body, message):
    with pytest.raises((InputError, ConfigError)) as e:
        parse(body, dit_info)
    assert message in str(e.value) and one_line(e.value) == str(e.value)


@pytest.mark.parametrize("raw, message", [
    (b"{", "got invalid JSON"),
    (b"[1]", "expected a JSON object, got list"),
    (b'{"class_labels": [1], "cfg_scale": NaN}', "expected finite numbers, got NaN"),
    (b'{"class_labels": [1], "seed": 1, "seed": 2}', "field 'seed' appears twice"),
    (b"\xff\xfe\x00", "expected a JSON object"),
    (b'{"class_labels": [1], "seed": ' + b"7" * 5000 + b"}", "expected integers of at most 4300 digits, got a longer"),
    (b'{"class_labels": [' + b"7" * 5000 + b"]}", "expected integers of at most 4300 digits, got a longer"),
])
def test_bodies_that_are_not_json_objects(dit_info, raw, message):
    with pytest.raises(InputError, match=None) as e:
        parse_request(raw, dit_info, 8)
    assert message in str(e.value)


def test_error_bodies_are_one_line():
    assert error_body(RuntimeError("first\nsecond")) == {"error": "first"}
    assert error_body("") == {"error": "error"}
    assert len(one_line("x" * 2000)) == 500


def test_options_are_checked():
    with pytest.raises(ConfigError, match="replicas must be >= 1, got 0"):
        ServeOptions("e", replicas=0)
    with pytest.raises(ConfigError, match="provider must be one of"):
        ServeOptions("e", provider="rocm")


def test_a_batch_equals_each_request_alone(engines_k4):
    """Three requests (one with two samples), one run, split back: each equals its solo run; a
    failing request (the fault hook) fails alone, its run's other requests are answered."""
    info = ModelInfo.from_manifest(engines_k4)
    worker = EngineWorker.load(str(engines_k4.directory), threads=1, fault_seed=666)
    pipe = Pipeline.load(engines_k4.directory)
    common = {"steps": 12, "method": "clusca", "interval": 3}
    requests = [parse(dict(common, class_labels=labels, seed=seed), info)
                for labels, seed in (([4, 7], 5), ([1], 8), ([1], 5))]
    replies = worker.run(requests)
    assert [r.meta["batch_requests"] for r in replies] == [3, 3, 3]
    assert replies[0].meta["chunks"] == 2  # 4 samples at batch 2
    for request, reply in zip(requests, replies):
        got = np.load(io.BytesIO(reply.body))
        want = pipe.generate(class_labels=list(request.labels), seed=request.seed, **common)
        assert reply.status == 200 and reply.media_type == "application/x-npz"
        assert rel_err(got["latents"], want.latents) <= TOL
        assert got["labels"].tolist() == list(request.labels)
    bad = parse(dict(common, class_labels=[2], seed=666), info)
    replies = worker.run([requests[1], bad])
    assert [r.status for r in replies] == [200, 500]
    assert replies[1].error == "engine run failed: EngineFailure: injected engine failure (a request with seed 666)"
    worker.close()


def test_flux_requests_batch_like_alone(flux_engines):
    """FLUX: embeddings and prompts, batched and alone."""
    info = ModelInfo.from_manifest(flux_engines)
    s = info.sampling
    rng = np.random.default_rng(0)
    embeds = [(rng.standard_normal((1, s["text_length"], s["text_dim"])).round(3),
               rng.standard_normal((1, s["pooled_dim"])).round(3)) for _ in range(2)]
    common = {"steps": 4, "guidance_scale": 3.0}
    requests = [parse(dict(common, prompt_embeds=e.tolist(), pooled_prompt_embeds=p.tolist(), seed=i), info)
                for i, (e, p) in enumerate(embeds)]
    prompts = [parse(dict(common, prompt=p, seed=4), info) for p in (["a red cat"], "a green dog")]
    assert requests[0].key == requests[1].key != prompts[0].key == prompts[1].key
    worker = EngineWorker.load(str(flux_engines.directory), threads=1)
    pipe = Pipeline.load(flux_engines.directory)
    for batch in (requests, prompts):
        replies = worker.run(batch)
        for request, reply in zip(batch, replies):
            assert reply.status == 200 and reply.meta["batch_requests"] == 2
            want = pipe.generate(**request.generate_arguments())
            got = np.load(io.BytesIO(reply.body))
            assert "labels" not in got and rel_err(got["latents"], want.latents) <= TOL
    with pytest.raises(InputError, match="prompt_embeds: expected numbers"):
        parse({"prompt_embeds": [[1.0]], "pooled_prompt_embeds": [[1.0]]}, info)
    with pytest.raises(InputError, match="unknown field 'class_labels' for a flux model"):
        parse({"class_labels": [1]}, info)
    worker.close()


def test_png_bytes_are_the_written_png(tmp_path):
    from clusca_trt.runtime.output import write_result

    images = np.random.default_rng(0).random((3, 8, 8, 1)).astype(np.float32)
    result = GenerateResult(np.zeros((3, 1, 8, 8), np.float32), np.arange(3), ClusCaConfig(), "cpu", "onnxruntime",
                            0.0, images=images)
    write_result(result, tmp_path / "a.png")
    assert result_bytes(result, "png") == (tmp_path / "a.png").read_bytes()
    write_result(result, tmp_path / "a.npz")
    assert sorted(np.load(tmp_path / "a.npz")) == ["images", "labels", "latents"]


def test_batches_form_when_the_engine_is_free(dit_info):
    """An idle engine waits one window for company; requests that arrive during a run are taken
    together by the next run, up to the batch; settings never mix; the oldest waiting goes first."""
    from clusca_trt.serve.worker import Batcher, Reply

    runs = []

    async def run(batch):
        runs.append([(r.steps, r.seed) for r in batch])
        await asyncio.sleep(0.2)
        return [Reply(200) for _ in batch]

    def request(seed, steps=10, samples=1):
        return parse({"class_labels": [1] * samples, "seed": seed, "steps": steps}, dit_info)

    async def scenario():
        batcher = Batcher(run, max_samples=4, window_s=0.05)
        first = [asyncio.create_task(batcher.submit(request(s))) for s in (0, 1)]  # idle: one window, together
        await asyncio.sleep(0.1)  # the first run is in progress: these queue
        later = [asyncio.create_task(batcher.submit(request(s))) for s in range(2, 8)]
        await asyncio.sleep(0.01)
        other = asyncio.create_task(batcher.submit(request(9, steps=20)))
        big = asyncio.create_task(batcher.submit(request(10, samples=6)))
        await asyncio.sleep(0.01)
        cancelled = asyncio.create_task(batcher.submit(request(11)))
        await asyncio.sleep(0.01)
        cancelled.cancel()
        replies = await asyncio.gather(*first, *later, other, big)
        assert all(r.status == 200 for r in replies)

    asyncio.run(scenario())
    # 6 and 7 waited longer than 9 (other settings), 9 longer than the big one (which fits no batch of 6 and 7)
    assert runs == [[(10, 0), (10, 1)], [(10, 2), (10, 3), (10, 4), (10, 5)], [(10, 6), (10, 7)], [(20, 9)],
                    [(10, 10)]]


def test_compare_runs_every_method_with_the_bodys_settings(dit_info):
    """full gets none of the ClusCa settings, FORA all but order, the others all; method and format
    are the endpoint's to choose."""
    info = dataclasses.replace(dit_info, decoded=True)
    runs = parse_compare(json.dumps({"class_labels": [1, 2], "seed": 4, "interval": 3, "order": 1}).encode(), info, 8)
    assert [r.config.method.value for r in runs] == ["full", "clusca", "fora", "taylorseer"]
    assert [(r.config.interval, r.config.order) for r in runs] == [(1, 2), (3, 1), (3, 0), (3, 1)]
    assert {(r.seed, r.labels, r.format) for r in runs} == {(4, (1, 2), "npz")}
    for body, message in [({"class_labels": [1], "method": "fora"}, "method: expected none in a /compare body"),
                          ({"class_labels": [1], "format": "png"}, "format: expected none in a /compare body"),
                          ({"class_labels": [1], "order": 0}, "taylorseer needs order >= 1")]:
        with pytest.raises((InputError, ConfigError), match=message):
            parse_compare(json.dumps(body).encode(), info, 8)
    with pytest.raises(InputError, match="compare needs a model with a decoder"):
        parse_compare(b'{"class_labels": [1]}', dit_info, 8)


def test_the_page_form_holds_what_the_parser_resolves(dit_info, flux_engines):
    """Every default the page shows is what parse_request resolves when the field is left out."""
    form = page_form(dit_info)
    fields = {f["name"]: f for f in form["fields"]}
    assert list(fields)[:3] == ["class_labels", "seed", "steps"] and "format" not in fields
    body = {"class_labels": fields["class_labels"]["default"]}
    resolved = parse(body, dit_info)
    assert fields["steps"]["default"] == resolved.steps and fields["seed"]["default"] == resolved.seed
    c = resolved.config
    assert [fields[k]["default"] for k in ("method", "interval", "propagation", "order", "warmup", "fresh")] == \
        [c.method.value, c.interval, c.propagation, c.order, c.warmup, c.fresh.value]
    assert {k: fields[k]["default"] for k in ("sampler", "cfg_scale")} == dict(resolved.sampling)
    assert fields["method"]["choices"] == ["clusca", "taylorseer", "fora", "full"]
    assert form["compare_methods"] == ["full", "clusca", "fora", "taylorseer"]
    flux = page_form(ModelInfo.from_manifest(flux_engines))
    assert [f["name"] for f in flux["fields"]][0] == "prompt" and flux["family"] == "flux"
    assert not {"prompt_embeds", "pooled_prompt_embeds"} & {f["name"] for f in flux["fields"]}


def test_warmup_requests_call_every_method_once(dit_info):
    runs = warmup_requests(dit_info)
    assert [(r.config.method.value, r.steps, r.samples) for r in runs] == \
        [("full", 8, 1), ("clusca", 8, 1), ("fora", 8, 1), ("taylorseer", 8, 1)]
    no_text = dataclasses.replace(dit_info, family="flux", text_encoders=False)
    assert warmup_requests(no_text) == []

"""Issue 12, case 1: threads sharing one ``Pipeline`` each get the result they get alone (the
pipeline serialises its calls with a lock; the engine holds one set of caches)."""

from __future__ import annotations

import threading

import numpy as np
import pytest

from clusca_trt.runtime.pipeline import Pipeline

SEEDS = (11, 22, 33, 44)


@pytest.mark.parametrize("method", ["clusca", "full", "taylorseer"])
def test_threads_sharing_a_pipeline_get_the_results_they_get_alone(micro, method):
    pipe = Pipeline.load(micro[2].directory)

    def run(seed):
        interval = None if method == "full" else 3
        return pipe.generate([1, 2, 3], seed=seed, steps=12, method=method, interval=interval).latents

    alone = {s: run(s) for s in SEEDS}
    for _trial in range(2):
        barrier = threading.Barrier(len(SEEDS))
        got, errors = {}, []

        def worker(seed):
            try:
                barrier.wait()
                got[seed] = run(seed)
            except Exception as e:  # surfaced below
                errors.append(e)

        threads = [threading.Thread(target=worker, args=(s,)) for s in SEEDS]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        assert not errors, errors
        for s in SEEDS:
            np.testing.assert_allclose(got[s], alone[s], rtol=0, atol=1e-6, err_msg=f"seed {s}")

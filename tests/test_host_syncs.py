"""A decode step reads nothing from the device (on CUDA every host read is a
sync that stalls the GPU's queue): the free-page count is bounded on the
host (see tests/test_cache.py for the bound), the compression figures are
read only when asked for, and the step can be captured in a CUDA graph while
the page pool has headroom."""

import collections

import pytest
import torch

from dms.models.qwen3.modeling_qwen3_dms import cache_kwargs
from dms.tiny import tiny_model

READS = ("item", "tolist", "__bool__", "__int__", "__float__", "__index__")


class _HostReads:
    """Counts reads of tensor values into Python (by where they happen)."""

    def __enter__(self):
        self.where = collections.Counter()
        self.saved = {name: getattr(torch.Tensor, name) for name in READS}

        def counted(name):
            read = self.saved[name]

            def call(tensor, *args, **kwargs):
                import traceback

                frame = traceback.extract_stack(limit=2)[0]
                self.where[f"{name} at {frame.filename.rsplit('/', 1)[-1]}:{frame.lineno}"] += 1
                return read(tensor, *args, **kwargs)
            return call
        for name in READS:
            setattr(torch.Tensor, name, counted(name))
        return self

    def __exit__(self, *exc):
        for name, read in self.saved.items():
            setattr(torch.Tensor, name, read)


def test_model_decode_steps_read_nothing_from_the_device():
    model = tiny_model(seed=0).eval()
    B = 8
    cache = model.get_cache(preallocate_for_tokens=1024)
    with torch.no_grad():
        out = model(input_ids=torch.randint(0, 300, (B, 100)), **cache_kwargs(cache))
        token = out.logits[:, -1:].argmax(-1)
        with _HostReads() as reads:
            for _ in range(300):
                out = model(input_ids=token, **cache_kwargs(cache))
                token = out.logits[:, -1:].argmax(-1)
        assert not reads.where, reads.where.most_common(5)
        with _HostReads() as reads:  # asked for: one read of the figures
            ratio = out.compression_ratio
            assert out.compression_ratios and out.compression_ratio == ratio > 1.0
        assert 0 < sum(reads.where.values()) <= 2, reads.where


@pytest.mark.cuda
def test_a_decode_step_is_captured_in_a_cuda_graph():
    """Two caches fed the same tokens; the last step runs eagerly on one and
    as a captured CUDA graph (replayed once) on the other: same logits, same
    cache contents."""
    model = tiny_model(seed=0).cuda().eval()
    g = torch.Generator(device="cuda").manual_seed(0)
    prompt = torch.randint(0, 300, (2, 60), device="cuda", generator=g)
    warm = [torch.randint(0, 300, (2, 1), device="cuda", generator=g) for _ in range(3)]
    last = torch.randint(0, 300, (2, 1), device="cuda", generator=g)
    eager_cache, graph_cache = (model.get_cache(preallocate_for_tokens=1024) for _ in range(2))
    with torch.no_grad():
        for cache in (eager_cache, graph_cache):
            model(input_ids=prompt, **cache_kwargs(cache))
        side = torch.cuda.Stream()
        side.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(side):  # warm-up off the default stream, as CUDA graph capture wants
            for token in warm:
                model(input_ids=token, **cache_kwargs(graph_cache))
        torch.cuda.current_stream().wait_stream(side)
        for token in warm:
            model(input_ids=token, **cache_kwargs(eager_cache))
        want = model(input_ids=last, **cache_kwargs(eager_cache)).logits
        static_input = last.clone()
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph):
            static_logits = model(input_ids=static_input, **cache_kwargs(graph_cache)).logits
        graph.replay()
        torch.cuda.synchronize()
    torch.testing.assert_close(static_logits, want)
    for a, b in zip(eager_cache.layers, graph_cache.layers):
        assert torch.equal(a.paged.row_slots, b.paged.row_slots) and torch.equal(a.paged.row_seen, b.paged.row_seen)

"""ProductKeyMemory(process_group=...) on 2 gloo CPU processes: each rank's output and every gradient
equal the unsharded layer's (the value shard's gradient: the ranks' average, as DDP averages)."""
import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from memlayers.distributed import column_range, column_widths
from memlayers.layers.pkm import ProductKeyMemory

WORLD = 2
CASES = [  # (layer arguments, each rank's leading input shape)
    (dict(dim=12, heads=2, num_keys=8, top_k=3, value_dim=11, key_dim=8), [(2, 3), (4,)]),  # 6 + 5 columns
    (dict(dim=10, heads=3, num_keys=6, top_k=4, gated=True, qk_norm=True), [(5,), (0,)]),  # a rank without tokens
]


def _data(seed, lead, width):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(*lead, width, generator=g)


def _reference(layer, x, g):
    """Output, input gradient and parameter gradients of one single-process call."""
    layer.zero_grad()
    x = x.clone().requires_grad_()
    y = layer(x)
    (y * g).sum().backward()
    return y.detach(), x.grad, {n: p.grad.clone() for n, p in layer.named_parameters()}


def _worker(rank, init_file):
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=WORLD)
    torch.set_num_threads(1)
    try:
        for kwargs, leads in CASES:
            torch.manual_seed(0)
            full = ProductKeyMemory(backend="torch", **kwargs)
            sharded = ProductKeyMemory(backend="torch", process_group=dist.group.WORLD, **kwargs)
            start, stop = sharded.value_columns
            assert sharded.values.shape == (full.num_values, stop - start)
            sharded.load_state_dict(full.state_dict())  # the whole table: each rank keeps its columns
            assert torch.equal(sharded.values, full.values[:, start:stop])
            assert torch.equal(sharded.full_values(), full.values)  # the group's columns, gathered

            out_dim = full.dim
            xs = [_data(10 + r, leads[r], full.dim) for r in range(WORLD)]
            gs = [_data(20 + r, leads[r], out_dim) for r in range(WORLD)]
            refs = [_reference(full, x, g) for x, g in zip(xs, gs)]

            x = xs[rank].clone().requires_grad_()
            y = sharded(x)
            (y * gs[rank]).sum().backward()
            ref_y, ref_dx, ref_grads = refs[rank]
            torch.testing.assert_close(y, ref_y, rtol=1e-6, atol=1e-6)
            torch.testing.assert_close(x.grad, ref_dx, rtol=1e-5, atol=1e-6)
            for name, p in sharded.named_parameters():
                if name == "values":  # the ranks' average, this rank's columns
                    expected = sum(r[2]["values"] for r in refs)[:, start:stop] / WORLD
                    assert expected.abs().sum() > 0
                else:
                    expected = ref_grads[name]
                torch.testing.assert_close(p.grad, expected, rtol=1e-5, atol=1e-6, msg=name)

        group = dist.group.WORLD
        other = ProductKeyMemory(dim=8, heads=1, num_keys=4, top_k=2, process_group=group)
        with pytest.raises(ValueError, match="same process_group"):
            ProductKeyMemory(dim=8, heads=1, num_keys=4, top_k=2, shared_values=other)
        with pytest.raises(ValueError, match="value_dim"):
            ProductKeyMemory(dim=8, heads=1, num_keys=4, top_k=2, value_dim=1, process_group=group)
        shared = ProductKeyMemory(dim=8, heads=1, num_keys=4, top_k=2, shared_values=other, process_group=group)
        assert shared.values is other.values
    finally:
        dist.destroy_process_group()


def test_sharded_pkm_equals_unsharded_layer(tmp_path):
    mp.spawn(_worker, args=(str(tmp_path / "init"),), nprocs=WORLD, join=True)


@pytest.mark.parametrize("value_dim, world", [(11, 2), (8, 4), (5, 5), (7, 3)])
def test_column_blocks_tile_the_table(value_dim, world):
    widths = column_widths(value_dim, world)
    assert sum(widths) == value_dim and max(widths) - min(widths) <= 1
    ranges = [column_range(value_dim, world, r) for r in range(world)]
    assert [a for a, _ in ranges] == [0] + [b for _, b in ranges[:-1]] and ranges[-1][1] == value_dim

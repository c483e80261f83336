"""The paper re-implementation is a fair baseline: it computes the same math on its format."""

import torch

from bench.paper_baseline import paper_project, paper_quantize, paper_reconstruct, paper_twa_step


def test_paper_path_computes_projection_and_reconstruction():
    P = torch.randn(4, 300)
    pb = paper_quantize(P, 8, [100, 200])
    dense = torch.cat([pb.mins[i] + pb.scales[i] * pb.codes[:, s : s + n].float()
                       for i, (s, n) in enumerate([(0, 100), (100, 200)])], dim=1)
    assert (dense - P).abs().max() <= pb.scales.max() / 2 + 1e-6  # one scale per layer, all rows
    g, x, center = torch.randn(300), torch.randn(4, 2), torch.randn(300)
    y = paper_project(pb, g)
    torch.testing.assert_close(y[:, 0], dense[:, :100] @ g[:100])
    torch.testing.assert_close(y[:, 1], dense[:, 100:] @ g[100:])
    w = paper_reconstruct(pb, x, center)
    torch.testing.assert_close(w[:100], center[:100] + dense[:, :100].T @ x[:, 0])
    torch.testing.assert_close(paper_twa_step(pb, g, x, center, lr=0.5), paper_reconstruct(pb, x - 0.5 * y, center))

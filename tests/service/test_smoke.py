import numpy as np
import torch
import torch.nn.functional as F


def test_worked_example_over_grpc(client):
    logits = np.array([[1.0, 2.0, 3.0]], dtype=np.float32)
    got = client.cross_entropy(logits, np.array([2]))
    want = F.cross_entropy(torch.from_numpy(logits), torch.tensor([2]))
    assert isinstance(got, np.ndarray) and got.dtype == np.float32 and got.shape == ()
    torch.testing.assert_close(torch.from_numpy(np.asarray(got)), want)

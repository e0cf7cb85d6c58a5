"""The benchmark scripts set cudnn.benchmark, TF32 and (--threads) the thread count: every test here restores them."""

import pytest
import torch


@pytest.fixture(autouse=True)
def _restore_global_settings():
    saved = (torch.backends.cudnn.benchmark, torch.backends.cudnn.allow_tf32, torch.backends.cuda.matmul.allow_tf32)
    threads = torch.get_num_threads()
    yield
    torch.backends.cudnn.benchmark, torch.backends.cudnn.allow_tf32, torch.backends.cuda.matmul.allow_tf32 = saved
    torch.set_num_threads(threads)

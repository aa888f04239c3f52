"""Loss normalisers that do not depend on how the batch is split over processes.

Each process divides its own sum by the count averaged over all processes; DDP averages the
gradients, so the loss it optimises is (sum over all images) / (count over all images): the
same with 8 images in one process as with 2 images in each of 4."""
import torch
import torch.distributed as dist

from detectron2.utils import comm


def global_mean(count, device=None, floor=1.0):
    """``count`` (a number or a tensor, any shape) summed over the processes, floored at
    ``floor``, divided by their number. The floor applies to the total, not to each process's
    share: a total under 1 then gives the same loss however it is split."""
    count = torch.as_tensor(count, dtype=torch.float32, device=device).detach()
    world_size = comm.get_world_size()
    if world_size > 1:
        count = count.clone()
        dist.all_reduce(count)
    return torch.clamp(count, min=floor) / world_size

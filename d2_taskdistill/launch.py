"""detectron2's ``launch()``, made to start CPU workers (gloo) on every supported detectron2.

detectron2 picks its backend from ``torch.cuda.is_available()``: NCCL wherever a GPU exists,
even for workers that train on the CPU (``MODEL.DEVICE cpu``), where NCCL fails; v0.6 also
asserts CUDA. CPU workers are therefore started here, on both detectron2s: same arguments,
same ``dist_url`` forms, same process groups, so ``detectron2.utils.comm`` works as usual.
GPU workers are detectron2's own.
"""
import functools
import logging
import os
import socket

import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from detectron2.engine import launch as d2_launch
from detectron2.engine.launch import DEFAULT_TIMEOUT
from detectron2.utils import comm

from . import compat

logger = logging.getLogger(__name__)


def launch(main_func, num_gpus_per_machine, num_machines=1, machine_rank=0, dist_url=None,
           args=(), timeout=DEFAULT_TIMEOUT, device=None):
    """Run ``main_func(*args)`` in ``num_gpus_per_machine`` processes on this machine
    (one per GPU, or per CPU worker), as :func:`detectron2.engine.launch`.

    device: the MODEL.DEVICE the workers train on; "cpu" starts gloo CPU workers even where
    CUDA exists. Default: CUDA where torch sees it.
    """
    world_size = num_machines * num_gpus_per_machine
    try:
        if world_size == 1 or not uses_cpu_workers(device):
            return d2_launch(main_func, num_gpus_per_machine, num_machines=num_machines,
                             machine_rank=machine_rank, dist_url=dist_url, args=args, timeout=timeout)
        return _launch_cpu_workers(main_func, num_gpus_per_machine, num_machines, machine_rank, dist_url,
                                   args, timeout)
    except Exception as e:
        if "EADDRINUSE" in str(e) or "address already in use" in str(e).lower():
            raise RuntimeError(
                f"--dist-url {dist_url}: its port is in use on this machine, so the processes cannot meet "
                "there. " + ("Give every machine the same --dist-url tcp://HOST:PORT with a free port on "
                             "machine 0 (HOST)." if num_machines > 1 else
                             "Use --dist-url auto, which picks a free port, or another port.")
            ) from e
        raise


def _launch_cpu_workers(main_func, num_gpus_per_machine, num_machines, machine_rank, dist_url, args, timeout):
    world_size = num_machines * num_gpus_per_machine
    main_func = functools.partial(_with_threads, main_func, cpu_threads_per_worker(num_gpus_per_machine))
    if dist_url == "auto":
        if num_machines != 1:
            raise ValueError(
                "--dist-url auto works on one machine only; with --num-machines > 1 give "
                "machine 0's address, e.g. --dist-url tcp://HOST:PORT, to every machine."
            )
        dist_url = f"tcp://127.0.0.1:{free_port()}"
    if not dist_url:
        raise ValueError("--dist-url is empty: use 'auto' (one machine) or tcp://HOST:PORT")
    logger.info("Starting %d CPU workers (gloo) of %d, dist_url=%s", num_gpus_per_machine, world_size, dist_url)
    mp.start_processes(
        _cpu_worker,
        nprocs=num_gpus_per_machine,
        args=(main_func, world_size, num_gpus_per_machine, machine_rank, dist_url, args, timeout),
        daemon=False,
    )


def started_by_torchrun():
    """Whether this process is one of torchrun's (TorchElastic's) workers: env:// rendezvous."""
    return all(k in os.environ for k in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "LOCAL_WORLD_SIZE", "MASTER_ADDR"))


def run_torchrun_worker(main_func, args=(), device=None, timeout=DEFAULT_TIMEOUT):
    """Run ``main_func(*args)`` in this torchrun worker: the process group from the environment
    (torchrun's store; gloo for CPU workers, NCCL on GPUs), detectron2's per-machine group,
    then ``main_func``."""
    local_rank, local_world = int(os.environ["LOCAL_RANK"]), int(os.environ["LOCAL_WORLD_SIZE"])
    cpu = uses_cpu_workers(device)
    if cpu:
        torch.set_num_threads(cpu_threads_per_worker(local_world))
    else:
        torch.cuda.set_device(local_rank)
    rank, world_size = int(os.environ["RANK"]), int(os.environ["WORLD_SIZE"])
    # Not init_method="env://": after a restart, torchrun's store still holds the previous round's
    # keys, and the new group would try to meet the dead workers' addresses (gloo: "connection
    # refused"). A prefix per restart keeps each round's keys apart.
    agent_store = os.environ.get("TORCHELASTIC_USE_AGENT_STORE") == "True"
    store = dist.TCPStore(os.environ["MASTER_ADDR"], int(os.environ["MASTER_PORT"]), world_size,
                          is_master=not agent_store and rank == 0, timeout=timeout)
    store = dist.PrefixStore(f"d2_taskdistill/restart{torchrun_restart_count()}", store)
    dist.init_process_group(backend="gloo" if cpu else "nccl", store=store, rank=rank, world_size=world_size,
                            timeout=timeout)
    # Printed: the loggers are set up later, by main_func.
    print(f"[d2_taskdistill] torchrun worker: rank {rank} of {world_size} (local {local_rank} of {local_world}), "
          f"restart {torchrun_restart_count()}, {'gloo' if cpu else 'nccl'}", flush=True)
    compat.create_local_process_group(local_world)
    comm.synchronize()
    try:
        return main_func(*args)
    finally:
        dist.destroy_process_group()


def from_main_process(compute):
    """``compute()`` on rank 0, its result on every rank (all ranks call this together): one answer
    where each rank would read a file that may change meanwhile. An error on rank 0 is raised on
    every rank, so none waits for the others."""
    if comm.get_world_size() == 1:
        return compute()
    outcome = None
    if comm.is_main_process():
        try:
            outcome = (True, compute())
        except Exception as e:
            outcome = (False, e)
    ok, value = comm.all_gather(outcome)[0]
    if ok:
        return value
    if comm.is_main_process():
        raise value
    raise RuntimeError(f"rank 0 failed ({type(value).__name__}: {value}); rank 0's log has the details") from None


def torchrun_restart_count():
    """How often torchrun has restarted this worker group (0: the first start)."""
    return int(os.environ.get("TORCHELASTIC_RESTART_COUNT", "0"))


def free_dist_url(dist_url, default_url, num_gpus_per_machine, num_machines):
    """"auto" (a free port) where ``dist_url`` is detectron2's fixed per-user default, one machine
    starts several processes, and that port is taken (e.g. by a second run of the same user);
    else ``dist_url`` unchanged."""
    if dist_url != default_url or num_machines != 1 or num_gpus_per_machine < 2:
        return dist_url
    host, port = dist_url.rsplit("/", 1)[-1].rsplit(":", 1)
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        try:
            sock.bind((host, int(port)))
        except OSError:
            logger.warning("Port %s of the default --dist-url %s is in use (another run?): using a free one",
                           port, dist_url)
            return "auto"
    return dist_url


def uses_cpu_workers(device):
    """Whether workers for MODEL.DEVICE ``device`` (None: the default) train on the CPU."""
    if device is None or str(device).startswith("cuda"):
        return not torch.cuda.is_available()  # cuda without a GPU: resolve_device falls back to cpu
    return True


def config_device(config_file, opts):
    """The device of a config and its overrides, read before workers start: MODEL.DEVICE of a
    yacs config, train.device of a LazyConfig (.py)."""
    from .config import is_lazy_config_file, load_config
    from .lazy_engine import load_lazy_config

    if is_lazy_config_file(config_file):
        return str(load_lazy_config(config_file, opts).train.get("device", "cuda"))

    return load_config(config_file, opts).MODEL.DEVICE


def cpu_threads_per_worker(workers_per_machine):
    """CPU workers share this machine's cores: torch would give each all of them."""
    return max(1, (os.cpu_count() or 1) // workers_per_machine)


def _with_threads(main_func, threads, *args):
    torch.set_num_threads(threads)
    return main_func(*args)


def free_port():
    """A TCP port on 127.0.0.1 that nothing listens on now."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def _cpu_worker(local_rank, main_func, world_size, num_per_machine, machine_rank, dist_url, args, timeout):
    global_rank = machine_rank * num_per_machine + local_rank
    dist.init_process_group(backend="gloo", init_method=dist_url, world_size=world_size,
                            rank=global_rank, timeout=timeout)
    compat.create_local_process_group(num_per_machine)
    comm.synchronize()
    try:
        main_func(*args)
        comm.synchronize()  # every rank done before any takes its group down
    finally:
        # Torn down here, not at interpreter exit, where gloo's threads can abort the process
        # ("terminate called without an active exception", seen on torch 2.11).
        dist.destroy_process_group()

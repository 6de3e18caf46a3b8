"""The Ray executor: members in Ray actors, driven by the same controller as the local executor.

Each actor hosts a *group* of members: with ``search.ray_group_size`` G = 1 (the default) one member,
trained as the local executor trains it; with G > 1 up to G consecutive members trained as one fused
model (a :class:`~rolekd.search.fused.FusedExecutor` inside the actor, e.g. 64 members on 4 GPUs as 4
groups of 16), so member logic has one code path whatever the executor. An actor builds its members
from the member configs with the member factory (pickled to the actor) inside its own process (its
own data, device and RNG), on the resources ``search.ray_num_cpus`` / ``search.ray_num_gpus`` *per
member* times the group's size (fractions allowed, e.g. 0.25 GPU = four members per GPU). Groups of a
round train concurrently. Weights move through Ray's object store: an exploit passes the ObjectRef of
the top member's ``get_state`` to the bottom member's ``set_state``, and the last good state of every
member is kept as a driver-owned ObjectRef, so the members of an actor that died are rebuilt and
restored from them. Ray Core only; ``search.ray_address`` None starts a local Ray instance (shut down
again at the end) unless Ray is already initialised in this process.

A local instance gets the CPUs this process may run on (its affinity), not the machine's count. Each
actor runs torch with ``train.threads`` threads (default: its CPUs, ``search.ray_num_cpus`` times the
group size, rounded down, at least 1, capped by this process's ``OMP_NUM_THREADS`` when set).
Connecting to ``search.ray_address`` is bounded by :data:`CONNECT_TIMEOUT_S`: an address that refuses
or does not answer is one UserError.
"""

from __future__ import annotations

import os
import re
import socket
import threading
from typing import Any, Mapping, Sequence

import rolekd

from ..config import Config, available_cpus, default_threads
from ..errors import UserError
from .fused import FusedExecutor
from .members import LocalExecutor, MemberFactory, Outcome


def import_ray():
    try:
        import ray
    except ImportError:
        raise UserError("search.executor=ray needs Ray: pip install 'ray>=2.9' (or use search.executor=local)") \
            from None
    return ray


_ACTOR_CLASS = None
CONNECT_TIMEOUT_S = 20.0  # the longest a connection to search.ray_address may take


def _host_port(address: str) -> tuple[str, int] | None:
    """(host, port) of ``host:port``, ``ray://host:port`` or ``[v6]:port``; None for other forms (``auto``)."""
    addr = address.strip()
    if "://" in addr:
        addr = addr.split("://", 1)[1]
    addr = addr.rstrip("/")
    host, sep, port = addr.rpartition(":")
    if not sep or not port.isdigit() or not host:
        return None
    return host.strip("[]"), int(port)


def _unreachable(address: str, timeout: float) -> OSError | None:
    """Why a TCP connection to ``address`` (host:port) does not open within ``timeout`` seconds; None when it
    opens, or for address forms without a port (``auto``), which cannot be checked."""
    hp = _host_port(address)
    if hp is None:
        return None
    try:
        with socket.create_connection(hp, timeout=timeout):
            return None
    except OSError as e:
        return e


def probe_address(address: str, timeout: float = CONNECT_TIMEOUT_S) -> None:
    """UserError unless a TCP connection to ``address`` (host:port) opens within ``timeout`` seconds."""
    e = _unreachable(address, timeout)
    if e is not None:
        why = "timed out" if isinstance(e, TimeoutError) else (e.strerror or type(e).__name__)
        raise UserError(f"cannot reach the Ray cluster at search.ray_address={address} ({why}); start it "
                        f"(ray start --head) or fix the address, or leave it unset for a local Ray") from None


def answers(address: str, timeout: float = 2.0) -> bool:
    """Whether the Ray cluster's head at ``address`` accepts a TCP connection within ``timeout`` seconds
    (True for address forms without a port, which cannot be checked)."""
    return _unreachable(address, timeout) is None


def within(seconds: float, fn, *args, **kwargs):
    """``fn(*args, **kwargs)`` run in a daemon thread; TimeoutError when it has not returned within
    ``seconds`` (it is then left behind: Ray's connection loop retries for many minutes in native code
    that no signal interrupts)."""
    out: dict[str, Any] = {}

    def target():
        try:
            out["value"] = fn(*args, **kwargs)
        except BaseException as e:  # handed to the caller
            out["error"] = e

    t = threading.Thread(target=target, name="rolekd-ray-connect", daemon=True)
    t.start()
    t.join(seconds)
    if t.is_alive():
        raise TimeoutError
    if "error" in out:
        raise out["error"]
    return out.get("value")


def connect_ray(address: str | None, init_kwargs: Mapping[str, Any] | None = None, ray=None, ship_code: bool = True):
    """Ray, connected: to ``address`` (probed first, bounded by :data:`CONNECT_TIMEOUT_S`; a UserError
    when it cannot be reached), or a local instance with the CPUs this process may use and the visible
    GPUs; nothing when Ray is already initialised. Returns (ray, whether this call started it). A local
    instance's workers import rolekd the way this process does (its package root joins their PYTHONPATH); on
    a cluster, ``ship_code`` sends this process's rolekd package with the job to every node (Ray's
    ``runtime_env`` ``py_modules``), otherwise each node imports its own. ``ray``: the module (default: Ray,
    imported)."""
    ray = ray if ray is not None else import_ray()
    if ray.is_initialized():
        return ray, False
    kw = {"include_dashboard": False, "log_to_driver": True}
    kw.update(init_kwargs or {})
    if address:
        probe_address(address)
        if ship_code:
            kw.setdefault("runtime_env", {"py_modules": [os.path.dirname(os.path.abspath(rolekd.__file__))]})
        try:
            within(CONNECT_TIMEOUT_S, ray.init, address=address, **kw)
        except (TimeoutError, ConnectionError, RuntimeError, ValueError) as e:
            why = ("no answer" if isinstance(e, TimeoutError)
                   else f"{type(e).__name__}: {str(e).splitlines()[0][:160] if str(e) else ''}")
            raise UserError(f"cannot connect to the Ray cluster at search.ray_address={address} within "
                            f"{CONNECT_TIMEOUT_S:g} s ({why}); check the address, that the cluster runs this Ray "
                            f"version and, if it uses token authentication (the default of `ray start --head` "
                            f"from Ray 2.59), that RAY_AUTH_MODE=token and its token are set here "
                            f"(docs/CLUSTER.md)") from None
    else:
        import torch

        # workers must import rolekd the way this process does (e.g. PYTHONPATH=src in a checkout)
        pkg_root = os.path.dirname(os.path.dirname(os.path.abspath(rolekd.__file__)))
        os.environ["PYTHONPATH"] = os.pathsep.join(p for p in (pkg_root, os.environ.get("PYTHONPATH", "")) if p)
        kw.setdefault("num_cpus", available_cpus())  # the CPUs this process may use, not the machine's
        kw.setdefault("num_gpus", torch.cuda.device_count())
        # a new instance of this process's own: without address="local", Ray would join a cluster that `ray start`
        # left running on this machine (and refuse num_cpus there); joining one is what search.ray_address is for
        ray.init(address="local", **kw)
    return ray, True


def missing_rolekd(error: BaseException) -> UserError | None:
    """The one-line UserError for a Ray error whose cause is a node that cannot import rolekd (Ray could not
    load a rolekd task or actor there); None for any other error."""
    text = str(error)
    missing = re.search(r"No module named '(rolekd[\w.]*)'", text)
    if not missing:
        return None
    where = re.search(r"ip=([\d.:a-f]+)", text)
    node = f"node {where.group(1)}" if where else "a node of the cluster"
    return UserError(f"{node} cannot import rolekd (no module named {missing.group(1)}): install rolekd "
                     f"{rolekd.__version__} on every node, or leave search.ray_ship_code=true to send this "
                     f"process's rolekd with the job (docs/CLUSTER.md)")


def _actor_class(ray):
    global _ACTOR_CLASS
    if _ACTOR_CLASS is not None:
        return _ACTOR_CLASS

    class GroupActor:
        """A group of members living in a Ray worker process: a local executor of one member, or a fused
        executor of several."""

        def __init__(self, factory: MemberFactory, cfg_data: dict[int, dict], threads: int | None, fused: bool):
            import torch

            if threads:
                torch.set_num_threads(int(threads))
            self.ex = FusedExecutor(factory) if fused else LocalExecutor(factory)
            self.ex.start({int(i): Config.model_validate(c) for i, c in cfg_data.items()})

        def device(self) -> str:
            return self.ex.device

        def train(self, policies: Mapping[int, Sequence[int]], epochs: int) -> dict[int, Outcome]:
            return self.ex.train(policies, epochs)

        def get_state(self, index: int) -> dict:
            return self.ex.members[index].state("cpu")

        def set_state(self, index: int, state: dict, rng: bool) -> bool:
            self.ex.members[index].load_state(state, rng=rng)
            return True

        def evaluate(self, index: int, split: str) -> dict:
            return self.ex.evaluate(index, split)

    _ACTOR_CLASS = ray.remote(GroupActor)
    return _ACTOR_CLASS


class RayExecutor:
    """Members as Ray actors (see the module docstring)."""

    name = "ray"

    def __init__(self, factory: MemberFactory, address: str | None = None, num_cpus: float = 1.0,
                 num_gpus: float = 0.0, threads: int | None = None, init_kwargs: Mapping[str, Any] | None = None,
                 group_size: int = 1, ship_code: bool = True):
        self.ray = import_ray()
        self.ship_code = ship_code
        self.factory = factory
        self.address = address
        self.num_cpus = float(num_cpus)
        self.num_gpus = float(num_gpus)
        self.group_size = max(1, int(group_size))
        self.threads = threads if threads is not None else default_threads(self.num_cpus * self.group_size)
        self.init_kwargs = dict(init_kwargs or {})
        self.started_ray = False
        self.groups: list[list[int]] = []  # the members of each actor
        self.group_of: dict[int, int] = {}
        self.actors: dict[int, Any] = {}  # group -> actor
        self.configs: dict[int, dict] = {}
        self.good: dict[int, Any] = {}  # member index -> ObjectRef of the last good state

    @classmethod
    def from_config(cls, cfg: Config, factory: MemberFactory) -> "RayExecutor":
        s = cfg.search
        return cls(factory, s.ray_address, s.ray_num_cpus, s.ray_num_gpus, threads=cfg.train.threads,
                   group_size=s.ray_group_size, ship_code=s.ray_ship_code)

    # ------------------------------------------------------------------------------ lifecycle
    def _init_ray(self) -> None:
        self.ray, self.started_ray = connect_ray(self.address, self.init_kwargs, self.ray, self.ship_code)

    def _check_resources(self, n: int) -> None:
        res = self.ray.cluster_resources()
        cpus, gpus = float(res.get("CPU", 0)), float(res.get("GPU", 0))
        need_c, need_g = n * self.num_cpus, n * self.num_gpus
        if need_c > cpus + 1e-9 or need_g > gpus + 1e-9:
            raise UserError(
                f"the Ray cluster has {cpus:g} CPUs / {gpus:g} GPUs but {n} members x (search.ray_num_cpus="
                f"{self.num_cpus:g}, search.ray_num_gpus={self.num_gpus:g}) need {need_c:g} / {need_g:g}; "
                f"every member lives in an actor: lower the per-member resources (fractions are allowed) "
                f"or the population")

    def _make_actor(self, group: int):
        cls = _actor_class(self.ray)
        ids = self.groups[group]
        return cls.options(num_cpus=self.num_cpus * len(ids), num_gpus=self.num_gpus * len(ids), max_restarts=0).remote(
            self.factory, {i: self.configs[i] for i in ids}, self.threads, self.group_size > 1)

    def _actor(self, index: int):
        return self.actors[self.group_of[index]]

    def start(self, configs: Mapping[int, Config]) -> None:
        self._init_ray()
        self._check_resources(len(configs))
        self.configs = {int(i): c.model_dump(mode="json") for i, c in configs.items()}
        ids = sorted(self.configs)
        self.groups = [ids[k:k + self.group_size] for k in range(0, len(ids), self.group_size)]
        self.group_of = {i: g for g, members in enumerate(self.groups) for i in members}
        self.actors = {g: self._make_actor(g) for g in range(len(self.groups))}
        self._get([a.device.remote() for a in self.actors.values()])  # surface build errors now

    def _get(self, refs):
        ray = self.ray
        try:
            return ray.get(refs)
        except ray.exceptions.RayError as e:
            if (missing := missing_rolekd(e)) is not None:
                raise missing from None
            cause = getattr(e, "cause", None) if isinstance(e, ray.exceptions.RayTaskError) else None
            if isinstance(cause, UserError):
                raise UserError(str(cause)) from None
            raise

    @property
    def device(self) -> str:
        if not self.actors:
            return "?"
        return self._get(next(iter(self.actors.values())).device.remote())

    def close(self) -> None:
        for a in self.actors.values():
            try:
                self.ray.kill(a)
            except Exception:
                pass
        self.actors.clear()
        self.good.clear()
        if self.started_ray and self.ray.is_initialized():
            self.ray.shutdown()
        self.started_ray = False

    # ------------------------------------------------------------------------------ executor API
    def train(self, policies: Mapping[int, Sequence[int]], epochs: int) -> dict[int, Outcome]:
        by_group: dict[int, dict[int, list[int]]] = {}
        for i, p in policies.items():
            by_group.setdefault(self.group_of[int(i)], {})[int(i)] = list(p)
        refs = {g: self.actors[g].train.remote(pols, int(epochs)) for g, pols in by_group.items()}
        out = {}
        for g, ref in refs.items():
            try:
                out.update(self._get(ref))
            except UserError:
                raise
            except Exception as e:  # actor died, task error outside the members' own handling
                why = f"{type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}"
                out.update({i: Outcome(error=why) for i in by_group[g]})
        return out

    def exploit(self, pairs: Sequence[tuple[int, int]]) -> None:
        states: dict[int, Any] = {}
        done = []
        for src, dst in pairs:
            if src not in states:
                states[src] = self._actor(src).get_state.remote(src)
            done.append(self._actor(dst).set_state.remote(dst, states[src], False))
        self._get(done)

    def snapshot(self, ids: Sequence[int] | None = None) -> None:
        for i in (self.configs if ids is None else ids):
            self.good[i] = self._actor(i).get_state.remote(i)  # actor calls run in submission order

    def restore(self, index: int) -> None:
        if index not in self.good:
            raise RuntimeError(f"member {index} has no saved state to restore")
        try:
            self._get(self._actor(index).set_state.remote(index, self.good[index], True))
        except UserError:
            raise
        except Exception:  # the actor is gone: rebuild it, then restore all of its members
            g = self.group_of[index]
            try:
                self.ray.kill(self.actors[g])
            except Exception:
                pass
            self.actors[g] = self._make_actor(g)
            self._get([self.actors[g].set_state.remote(i, self.good[i], True) for i in self.groups[g]
                       if i in self.good])

    def saved_states(self, ids: Sequence[int] | None = None) -> dict[int, dict]:
        ids = list(self.configs if ids is None else ids)
        missing = [i for i in ids if i not in self.good]
        if missing:
            self.snapshot(missing)
        return dict(zip(ids, self._get([self.good[i] for i in ids])))

    def load_states(self, states: Mapping[int, dict]) -> None:
        self._get([self._actor(int(i)).set_state.remote(int(i), s, True) for i, s in states.items()])
        self.snapshot([int(i) for i in states])

    def evaluate(self, index: int, split: str = "test") -> dict:
        return self._get(self._actor(index).evaluate.remote(index, split))

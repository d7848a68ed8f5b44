"""Test helpers for the Flower apps: an in-process Grid and a tiny synthetic RunSpec.

``LocalGrid`` delivers each message to a ClientApp synchronously.

Mimics the engine where it matters to the server: a ClientApp exception becomes an error reply
whose reason is "<class ...>:<'text'>" (as flwr's runtime formats it), nodes can be offline
(not listed) or silent (listed, never answer), and every sent message and reply is kept.
"""
from __future__ import annotations

from collections.abc import Callable, Iterable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from flwr.app import Context, Error, Message, RecordDict
from flwr.clientapp import ClientApp
from flwr.serverapp import Grid
from flwr.supercore.task_identity import TaskIdentity

from common.config import ExperimentConfig, replace
from common.federation import FederationConfig, RunSpec, SiteSpec

SITES = ("A", "B", "C")


def tiny_spec(run_dir: Path | str, rounds: int = 2, synthetic_n: int = 16, **fed: Any) -> RunSpec:
    """Three synthetic sites, 32-px images, a 4-channel depth-2 U-Net: seconds per round on CPU."""
    exp = replace(ExperimentConfig(), **{
        "data.image_size": 32, "data.augment": False, "model.arch": "small", "model.base_channels": 4,
        "model.depth": 2, "model.num_groups": 2, "train.batch_size": 8, "train.device": "cpu",
        "train.num_threads": 1,
    })
    sites = tuple(SiteSpec(name, synthetic_centre=c, synthetic_n=synthetic_n)
                  for name, c in zip(SITES, ("SynPL", "SynES1", "SynEG")))
    fed = {"rounds": rounds, "min_sites": 2, "quorum_timeout_s": 5.0, **fed}
    return RunSpec(experiment=exp, federation=FederationConfig(**fed), sites=sites, run_dir=str(run_dir))


@contextmanager
def task_identity(run_id: int = 1, node_id: int = 0) -> Iterator[None]:
    """Instruction Messages read run/node/task ids from TaskIdentity, which Flower's runtimes
    set per process; tests outside a runtime set it here and restore it afterwards."""
    saved = (TaskIdentity._run_id, TaskIdentity._node_id, TaskIdentity._task_id)
    TaskIdentity.run_id, TaskIdentity.node_id, TaskIdentity.task_id = run_id, node_id, 1
    try:
        yield
    finally:
        TaskIdentity._run_id, TaskIdentity._node_id, TaskIdentity._task_id = saved


class LocalGrid(Grid):
    def __init__(self, client_app: ClientApp, node_configs: dict[int, dict[str, Any]]) -> None:
        self.app = client_app
        self.contexts = {
            nid: Context(run_id=1, node_id=nid, node_config=dict(cfg), state=RecordDict(), run_config={})
            for nid, cfg in node_configs.items()
        }
        self.offline: set[int] = set()
        self.silent: set[int] = set()
        self.sent: list[Message] = []
        self.replies: list[Message] = []
        self.before_send: Callable[[list[Message]], None] | None = None

    def set_run(self, run: Any) -> None:  # pragma: no cover - not used by the round loop
        pass

    @property
    def run(self) -> Any:  # pragma: no cover
        raise NotImplementedError

    def create_message(self, content: RecordDict, message_type: str, dst_node_id: int,
                       group_id: str, ttl: float | None = None) -> Message:
        return Message(content=content, dst_node_id=dst_node_id, message_type=message_type,
                       group_id=group_id, ttl=ttl)

    def get_node_ids(self) -> Iterable[int]:
        return [n for n in self.contexts if n not in self.offline]

    def push_messages(self, messages: Iterable[Message]) -> Iterable[str]:  # pragma: no cover
        raise NotImplementedError

    def pull_messages(self, message_ids: Iterable[str]) -> Iterable[Message]:  # pragma: no cover
        raise NotImplementedError

    def send_and_receive(self, messages: Iterable[Message], *, timeout: float | None = None) -> Iterable[Message]:
        messages = list(messages)
        if self.before_send is not None:
            self.before_send(messages)
        replies = []
        for msg in messages:
            self.sent.append(msg)
            node = msg.metadata.dst_node_id
            if node in self.offline or node in self.silent:
                continue
            try:
                reply = self.app(msg, self.contexts[node])
            except Exception as ex:  # noqa: BLE001 - the engine turns it into an error reply
                reply = Message(Error(code=2, reason=str(type(ex)) + ":<'" + str(ex) + "'>"), reply_to=msg)
            replies.append(reply)
        self.replies.extend(replies)
        return replies


class Killed(RuntimeError):
    """The coordinator 'dies' right after a round's checkpoint (``killed_after``)."""


@contextmanager
def killed_after(server_round: int) -> Iterator[None]:
    """Within the block, the server stops dead once round ``server_round``'s checkpoint is
    written: a run interrupted there with its own settings (a shorter run would have another
    run-wide schedule, so it is not the same run)."""
    from server.state import ServerRunFolder

    real = ServerRunFolder.save

    def save(self: ServerRunFolder, rnd: int, *args: Any, **kwargs: Any) -> Path:
        path = real(self, rnd, *args, **kwargs)
        if rnd == server_round:
            raise Killed(f"killed after round {rnd}")
        return path

    ServerRunFolder.save = save  # type: ignore[method-assign]
    try:
        yield
    except Killed:
        pass
    finally:
        ServerRunFolder.save = real  # type: ignore[method-assign]

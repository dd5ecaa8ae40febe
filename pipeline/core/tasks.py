"""The unit of work a distributor runs: a small, picklable, deterministic reference to one input shard."""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class ShardTask:
    """One input shard to process: small, picklable and deterministic."""

    shard_id: str
    input_url: str  # a tar/parquet URL, or for folder inputs a "folder shard" (see members)
    output: str
    kind: str  # "webdataset" | "parquet" | "folder"
    members: tuple[str, ...] = ()  # folder inputs: the image URLs of this shard, sorted

    @property
    def name(self) -> str:
        """How distributors name the task (in log lines and results): its shard id."""
        return self.shard_id

    def members_digest(self) -> str | None:
        """Identifies a folder shard's content, so a committed one is redone when the folder changed."""
        if not self.members:
            return None
        import hashlib

        return hashlib.sha256("\n".join(self.members).encode()).hexdigest()

"""``fed.partition_owners``: which registered node key owns which partition.

The value is ``"SHA256:<fingerprint>=<partition>,..."``, the OpenSSH fingerprints
``ssh-keygen -lf`` prints. Parsing it needs nothing but the text and the number of
partitions, so the schema refuses a bad table when the config is built, long
before a SuperLink or Ray starts; the strategy uses the parsed table at start-up.
"""

from __future__ import annotations

import re

_FINGERPRINT = re.compile(r"SHA256:[A-Za-z0-9+/]{43}")


def parse_partition_owners(text: str, num_partitions: int) -> dict[str, int]:
    """Parse ``"SHA256:<fp>=<partition>,..."`` into fingerprint -> partition.

    Parameters
    ----------
    text
        The table; empty (or blank) for none.
    num_partitions
        ``fed.num_clients``: every partition id must be below it.

    Returns
    -------
    dict[str, int]
        Fingerprint -> partition id, in the order written.

    Raises
    ------
    ValueError
        On a malformed entry, a partition outside ``[0, num_partitions)``, or a
        fingerprint or partition listed twice, naming the entry.
    """
    owners: dict[str, int] = {}
    if not text.strip():
        return owners
    for entry in text.split(","):
        fp, sep, pid_text = entry.strip().rpartition("=")
        if not sep or not _FINGERPRINT.fullmatch(fp) or not pid_text.isdigit():
            raise ValueError(
                f"`fed.partition_owners` entry {entry.strip()!r} should be "
                "'SHA256:<43 base64 characters>=<partition id>' (as ssh-keygen -lf "
                "prints a key's fingerprint)"
            )
        pid = int(pid_text)
        if pid >= num_partitions:
            raise ValueError(
                f"`fed.partition_owners` gives partition {pid} but there are "
                f"fed.num_clients={num_partitions} partitions"
            )
        if fp in owners or pid in owners.values():
            raise ValueError(
                f"`fed.partition_owners` lists {fp if fp in owners else pid} twice; "
                "each key owns one partition and each partition one key"
            )
        owners[fp] = pid
    return owners

"""The trainers' NetworkPolicies put back promptly when someone with edit rights deletes or edits
one: the namespace's shared ``kubetune-trainers`` while an unfinished FineTuneJob is there, a
group's own while its FineTuneJob is unfinished. kopf's watch of the NetworkPolicies labelled as
kubetune's brings each change (``policy_watch.register``); what belongs at the policy's place is
decided here from the indexes (``wanted``, pure); the write (one GET, then a create or a PUT of
the rendered policy) is ``creation.ensure_rendered``, on a worker thread."""

from __future__ import annotations

from collections.abc import Callable

from kubetune.api.contract import FINETUNEJOB_ANNOTATION
from kubetune.operator.companions import group_policy, shared, trainers_policy
from kubetune.operator.names import child_metadata, child_names, owned_by
from kubetune.operator.objects import Key, Manifest, Obj
from kubetune.operator.planner import FINISHED
from kubetune.operator.settings import OperatorSettings


def unfinished(ftj: Obj | None) -> bool:
    """Whether ``ftj`` (as the index holds it) may still run pods: not finished, not deleted."""
    if ftj is None or (ftj.get("metadata") or {}).get("deletionTimestamp"):
        return False
    return (ftj.get("status") or {}).get("phase") not in FINISHED


def wanted(
    policy: Obj,
    settings: OperatorSettings,
    *,
    unfinished_job: Callable[[Key], Obj | None],
    namespace_busy: Callable[[str], bool],
) -> Manifest | None:
    """The policy kubetune renders at ``policy``'s place now, or None: nothing of kubetune's
    belongs there now (the namespace's jobs are all finished; the group's job is finished or
    gone; a policy of a predecessor of the same name).

    ``unfinished_job(key)``: the FineTuneJob of that key if it is unfinished;
    ``namespace_busy(namespace)``: whether one there is."""
    metadata = policy.get("metadata") or {}
    namespace = str(metadata.get("namespace"))
    if shared(dict(policy)):
        return trainers_policy(namespace, settings) if namespace_busy(namespace) else None
    owner = (metadata.get("annotations") or {}).get(FINETUNEJOB_ANNOTATION)
    ftj = unfinished_job((namespace, str(owner))) if owner else None
    if ftj is None:
        return None
    uid = str(ftj["metadata"].get("uid"))
    nodes = int(((ftj.get("spec") or {}).get("resources") or {}).get("nodes") or 1)
    names = child_names(str(owner), nodes)
    if nodes < 2 or not owned_by(policy, uid) or metadata.get("name") != names.network_policy:
        return None
    return group_policy(str(owner), names, child_metadata(str(owner), namespace, uid), uid)


def needs_writing(event_type: str | None, policy: Obj, manifest: Manifest) -> bool:
    """Whether the policy an event shows must be written again: it is gone, or its spec is not
    the rendered one (what this operator wrote comes back as an event too, and needs nothing)."""
    return event_type == "DELETED" or policy.get("spec") != manifest["spec"]

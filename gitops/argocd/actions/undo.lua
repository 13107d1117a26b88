-- Argo CD action `undo` for an EnterpriseAgent: what `kubectl ea undo` does. It sets
-- agents.enterprise.io/undo to a new token (the current UTC time, as `retry` writes it). The
-- previous revision's spec is in a ControllerRevision this action cannot read, so the operator
-- answers each token once, in status.lastUndo: Undone (the fields that make a revision set back
-- to that revision's; replicas, autoscaling and the rollout settings stay) or Refused with the
-- reason, and an Event. The spec then differs from Git: with auto-sync and self-heal on, Argo CD
-- puts the Git spec back; commit the rollback to keep it.

local function present(value)
  return value ~= nil and value ~= ""
end

local status = obj.status or {}
if not present(status.activeColor) then
  error(obj.metadata.name .. " has not served any revision yet", 0)
end
local previous = (status.rollout or {}).previousRevision
if present(status.previewRevision) then
  previous = status.activeRevision
end
if not present(previous) then
  error(obj.metadata.name .. " has no previous revision to go back to", 0)
end
if obj.metadata.annotations == nil then
  obj.metadata.annotations = {}
end
obj.metadata.annotations["agents.enterprise.io/undo"] = os.date("!%Y%m%dT%H%M%S") .. ".000000Z"
return obj

-- Argo CD action `abort` for an EnterpriseAgent: what `kubectl ea abort` does. It sets the annotation
-- agents.enterprise.io/abort to the revision under rollout (the preview's before promotion, the newly
-- active one after it); the operator keeps traffic on, or returns it to, the stable colour. An
-- annotation, not a spec change, so it does not fight a sync.

local status = obj.status or {}
local step = (status.rollout or {}).step
local revision
if step == "Preview" or step == "Analysis" or step == "AwaitingPromotion" or step == "Promoting" then
  revision = status.previewRevision
elseif step == "PostPromotion" then
  revision = status.activeRevision
else
  error(obj.metadata.name .. " has no rollout in progress (step: " .. tostring(step or "none")
    .. "); roll back in Git, or with `kubectl ea undo`", 0)
end
if obj.metadata.annotations == nil then
  obj.metadata.annotations = {}
end
obj.metadata.annotations["agents.enterprise.io/abort"] = revision
return obj

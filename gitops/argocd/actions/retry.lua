-- Argo CD action `retry` for an EnterpriseAgent: what `kubectl ea retry` does. It removes the
-- agents.enterprise.io/abort annotation and sets agents.enterprise.io/retry to a new token, the
-- current UTC time in the form `kubectl ea` writes (Argo CD's Lua has no sub-second clock, so the
-- fraction is zero); the operator starts the aborted revision's rollout again.

local status = obj.status or {}
if (status.rollout or {}).step ~= "Aborted" then
  error(obj.metadata.name .. " has no aborted rollout to retry", 0)
end
if obj.metadata.annotations == nil then
  obj.metadata.annotations = {}
end
obj.metadata.annotations["agents.enterprise.io/abort"] = nil
obj.metadata.annotations["agents.enterprise.io/retry"] = os.date("!%Y%m%dT%H%M%S") .. ".000000Z"
return obj

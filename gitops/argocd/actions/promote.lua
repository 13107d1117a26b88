-- Argo CD action `promote` for an EnterpriseAgent: what `kubectl ea promote` does. It approves the
-- preview by setting spec.rollout.promote to status.previewRevision, the change a Git commit of that
-- field would make. Commit the same field to keep the approval in Git.

local status = obj.status or {}
local step = (status.rollout or {}).step
local revision = status.previewRevision
local name = obj.metadata.name
if revision == nil or revision == "" or (step ~= "Preview" and step ~= "Analysis" and step ~= "AwaitingPromotion") then
  error(name .. " has no rollout waiting for promotion (step: " .. tostring(step or "none") .. ")", 0)
end
if obj.spec.rollout == nil or obj.spec.rollout.promotion ~= "Manual" then
  error(name .. " promotes automatically (spec.rollout.promotion: Auto); nothing to approve", 0)
end
obj.spec.rollout.promote = revision
return obj

-- Argo CD resource actions for agents.enterprise.io/EnterpriseAgent: which of them the agent's status
-- allows now. Each action is enabled exactly when `kubectl ea <verb>` would act (see
-- operator/agent_operator/plugin.py; the project's tests check the two agree on statuses the operator
-- wrote). Written for Argo CD's Lua (gopher-lua, Lua 5.1, no string library); tested under 5.1 and 5.4.
--
--   promote  spec.rollout.promotion is Manual and a preview is at Preview, Analysis or
--            AwaitingPromotion (phase Paused): approve it, before or after its analysis
--   abort    a rollout is under way (Preview to PostPromotion)
--   retry    the last rollout was aborted (on request, failed analysis or progress deadline)
--   undo     the agent has served a revision and the status names one to go back to: the serving
--            one during or after a failed rollout, else the one before the last promotion (the
--            operator finds its spec in a ControllerRevision and sets it back)

local actions = {
  promote = { disabled = true, iconClass = "fa fa-fw fa-forward", displayName = "Promote the preview" },
  abort = { disabled = true, iconClass = "fa fa-fw fa-stop", displayName = "Abort the rollout" },
  retry = { disabled = true, iconClass = "fa fa-fw fa-redo", displayName = "Retry the aborted rollout" },
  undo = { disabled = true, iconClass = "fa fa-fw fa-undo", displayName = "Set the spec back to the previous revision" },
}

local function present(value)
  return value ~= nil and value ~= ""
end

local function one_of(value, list)
  for _, item in ipairs(list) do
    if value == item then
      return true
    end
  end
  return false
end

local status = obj.status or {}
local step = (status.rollout or {}).step
local promotion = ((obj.spec or {}).rollout or {}).promotion or "Auto"

if status.previewRevision ~= nil and status.previewRevision ~= ""
    and one_of(step, { "Preview", "Analysis", "AwaitingPromotion" }) and promotion == "Manual" then
  actions.promote.disabled = false
end
if one_of(step, { "Preview", "Analysis", "AwaitingPromotion", "Promoting", "PostPromotion" }) then
  actions.abort.disabled = false
end
if step == "Aborted" then
  actions.retry.disabled = false
end
local previous = (status.rollout or {}).previousRevision
if present(status.previewRevision) then
  previous = status.activeRevision
end
if present(status.activeColor) and present(previous) then
  actions.undo.disabled = false
end
return actions

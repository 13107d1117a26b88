-- Argo CD resource actions for agents.enterprise.io/EnterpriseAgent: which of them the agent's status
-- allows now. Each action is enabled exactly when `kubectl ea <verb>` would act (see
-- operator/agent_operator/plugin.py; the project's tests check the two agree on statuses the operator
-- wrote). Written for Argo CD's Lua (gopher-lua, Lua 5.1, no string library); tested under 5.1 and 5.4.
--
--   promote  spec.rollout.promotion is Manual and a preview is at Preview, Analysis or
--            AwaitingPromotion (phase Paused): approve it, before or after its analysis
--   abort    a rollout is under way (Preview to PostPromotion)
--   retry    the last rollout was aborted (on request, failed analysis or progress deadline)
--
-- There is no undo: `kubectl ea undo` reads the previous spec from a ControllerRevision, which an
-- action (it sees only this object) cannot; roll back in Git or with Argo CD's History and Rollback.

local actions = {
  promote = { disabled = true, iconClass = "fa fa-fw fa-forward", displayName = "Promote the preview" },
  abort = { disabled = true, iconClass = "fa fa-fw fa-stop", displayName = "Abort the rollout" },
  retry = { disabled = true, iconClass = "fa fa-fw fa-redo", displayName = "Retry the aborted rollout" },
}

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
return actions

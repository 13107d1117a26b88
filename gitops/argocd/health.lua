-- Argo CD health check for agents.enterprise.io/EnterpriseAgent.
--
-- Reads only what the operator writes: status.observedGeneration, status.phase and the conditions
-- Ready, Stalled, Degraded (see README, "GitOps"). Written for Argo CD's Lua (gopher-lua, Lua 5.1);
-- the project's tests run it under Lua 5.1 and 5.4 against statuses the operator produced.
--
--   Healthy      Ready=True: the active colour serves the spec's revision
--   Progressing  no status yet, a generation not yet observed, or a rollout under way
--   Suspended    phase Paused: a Manual rollout passed analysis and waits for approval
--   Degraded     Stalled=True (bad input) or Degraded=True (aborted, failed analysis, deadline)

local hs = { status = "Progressing", message = "Waiting for the operator to report status" }

local function condition(conditions, wanted)
  if conditions == nil then
    return nil
  end
  for _, c in ipairs(conditions) do
    if c.type == wanted then
      return c
    end
  end
  return nil
end

local function reason(c, fallback)
  if c.reason ~= nil and c.reason ~= "" then
    return c.reason
  end
  return fallback
end

local function said(c, fallback)
  if c ~= nil and c.message ~= nil and c.message ~= "" then
    return c.message
  end
  return fallback
end

if obj.status == nil then
  return hs
end

local status = obj.status
local generation = obj.metadata.generation
if generation ~= nil and (status.observedGeneration == nil or status.observedGeneration < generation) then
  hs.message = "Waiting for the operator to observe generation " .. tostring(generation)
  return hs
end

local conditions = status.conditions
local degraded = condition(conditions, "Degraded")
local stalled = condition(conditions, "Stalled")
if degraded ~= nil and degraded.status == "True" then
  hs.status = "Degraded"
  hs.message = reason(degraded, "Degraded") .. ": " .. said(degraded, "the rollout did not complete")
  return hs
end
if stalled ~= nil and stalled.status == "True" then
  hs.status = "Degraded"
  hs.message = reason(stalled, "Stalled") .. ": " .. said(stalled, "the operator cannot make progress")
  return hs
end

if status.phase == "Paused" then
  hs.status = "Suspended"
  hs.message = status.message or "Waiting for promotion"
  return hs
end

local ready = condition(conditions, "Ready")
if ready ~= nil and ready.status == "True" then
  hs.status = "Healthy"
  hs.message = said(ready, "Ready")
  return hs
end

hs.message = status.message or said(ready, "Progressing")
return hs

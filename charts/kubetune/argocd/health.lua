-- Argo CD health check for kubetune.io/FineTuneJob (resource.customizations.health.kubetune.io_FineTuneJob).
-- Maps the operator's status (phase, conditions, observedGeneration) onto Argo CD's health:
--   Succeeded                                  -> Healthy
--   Failed, or a Failed condition that is True -> Degraded
--   Suspended, or spec.runPolicy.suspend       -> Suspended
--   no status yet, a spec change not yet seen,
--   Pending, Queued, Running                   -> Progressing
local hs = {}

local function condition(status, type_)
  if status.conditions == nil then
    return nil
  end
  for _, c in ipairs(status.conditions) do
    if c.type == type_ then
      return c
    end
  end
  return nil
end

local function progress_message(status)
  local p = status.progress
  if p ~= nil and p.percent ~= nil then
    local text = string.format("%.0f%% done", p.percent)
    if p.step ~= nil and p.totalSteps ~= nil then
      text = text .. string.format(" (step %d/%d)", p.step, p.totalSteps)
    end
    return text
  end
  return nil
end

local suspended_in_spec = obj.spec ~= nil and obj.spec.runPolicy ~= nil and obj.spec.runPolicy.suspend == true
local status = obj.status

if status == nil or status.phase == nil then
  if suspended_in_spec then
    hs.status = "Suspended"
    hs.message = "Suspended by spec.runPolicy.suspend"
  else
    hs.status = "Progressing"
    hs.message = "Waiting for the kubetune operator"
  end
  return hs
end

local failed = condition(status, "Failed")
if status.phase == "Failed" or (failed ~= nil and failed.status == "True") then
  hs.status = "Degraded"
  if failed ~= nil then
    hs.message = (failed.reason or "Failed") .. ": " .. (failed.message or "")
  else
    hs.message = "Training failed"
  end
  return hs
end

local generation = obj.metadata ~= nil and obj.metadata.generation or nil
if generation ~= nil and status.observedGeneration ~= nil and status.observedGeneration < generation then
  hs.status = "Progressing"
  hs.message = "Waiting for the operator to observe generation " .. tostring(generation)
  return hs
end

if status.phase == "Succeeded" then
  hs.status = "Healthy"
  if status.result ~= nil and status.result.adapter ~= nil and status.result.adapter.uri ~= nil then
    hs.message = "Adapter at " .. status.result.adapter.uri
  else
    hs.message = "Training succeeded"
  end
  return hs
end

if status.phase == "Suspended" then
  hs.status = "Suspended"
  local c = condition(status, "Suspended")
  hs.message = (c ~= nil and c.message) or "Suspended"
  return hs
end

-- Pending, Queued, Running: say why it waits (e.g. Unschedulable) or how far it got.
hs.status = "Progressing"
local ready = condition(status, "Ready")
local running = condition(status, "Running")
local message = progress_message(status)
if message == nil and ready ~= nil and ready.status == "False" and ready.message ~= nil and ready.message ~= "" then
  message = (ready.reason or status.phase) .. ": " .. ready.message
end
if message == nil and running ~= nil and running.message ~= nil and running.message ~= "" then
  message = running.message
end
hs.message = message or status.phase
return hs

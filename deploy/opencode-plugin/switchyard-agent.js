// Switchyard agent header for opencode (checked against opencode 1.18.33).
//
// opencode does not say which agent a request is for. Its `chat.headers` plugin hook does know
// (input.agent: build, plan, general, explore, title, compaction, summary, or a custom agent's
// name), so this plugin adds `x-opencode-agent: <agent>` to every request for a Switchyard
// provider. Switchyard then classifies the role exactly instead of guessing from the prompt.
//
// Register it in opencode.json:   "plugin": ["./opencode-plugin/switchyard-agent.js"]
// (a path relative to that opencode.json), or drop this file into ~/.config/opencode/plugin/ or
// <project>/.opencode/plugin/, where opencode loads it without any config entry.
//
// Options (tuple form, e.g. ["./opencode-plugin/switchyard-agent.js", {"providers": ["switchyard", "gw"]}]):
//   providers  provider ids (keys of opencode.json's "provider") that get the header;
//              default ["switchyard"]; "*" means every provider.
//   header     the header name; default "x-opencode-agent".

const DEFAULT_PROVIDERS = ["switchyard"]

/** @type {import("@opencode-ai/plugin").Plugin} */
export const SwitchyardAgent = async (_input, options = {}) => {
  const providers = options.providers ?? DEFAULT_PROVIDERS
  const header = options.header ?? "x-opencode-agent"
  const all = providers === "*" || (Array.isArray(providers) && providers.includes("*"))
  const wanted = new Set(Array.isArray(providers) ? providers : [providers])
  return {
    "chat.headers": async (input, output) => {
      if (!input.agent) return
      if (!all && !wanted.has(input.model?.providerID)) return
      output.headers[header] = String(input.agent)
    },
  }
}

// Streams one chat request through Switchyard with the client opencode uses
// (ai + @ai-sdk/openai-compatible) and prints what it saw as one JSON line.
// usage: node stream.mjs BASE_URL MODEL PROMPT [HEADERS_JSON]
import { createOpenAICompatible } from "@ai-sdk/openai-compatible";
import { streamText } from "ai";

const [baseURL, modelId, prompt, headersJson] = process.argv.slice(2);
const provider = createOpenAICompatible({
  name: "switchyard",
  baseURL,
  apiKey: "unused",
  includeUsage: true, // opencode sets stream_options.include_usage and compacts from the usage
  headers: headersJson ? JSON.parse(headersJson) : undefined,
});

const out = { text: "", parts: 0, usage: null, finishReason: null, error: null, events: [] };
try {
  const result = streamText({
    model: provider.chatModel(modelId),
    prompt,
    maxOutputTokens: 24,
    maxRetries: 0,
  });
  for await (const part of result.fullStream) {
    out.events.push(part.type);
    if (part.type === "text-delta") {
      out.parts += 1;
      out.text += part.text ?? part.delta ?? "";
    } else if (part.type === "error") {
      out.error = String(part.error?.message ?? part.error);
    }
  }
  out.usage = await result.totalUsage;
  out.finishReason = await result.finishReason;
} catch (e) {
  out.error = String(e?.message ?? e);
}
out.events = [...new Set(out.events)];
console.log(JSON.stringify(out));

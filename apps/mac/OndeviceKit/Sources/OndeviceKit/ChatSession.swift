import CoreML
import Foundation
import Tokenizers

/// A chat over an exported package: the manifest's tokenizer and chat template, greedy
/// decoding, streamed text, cancellation through Swift's task cancellation.
@available(macOS 15.0, iOS 18.0, *)
public final class ChatSession {
    public let model: PagedCoreMLModel
    private let tokenizer: Tokenizer
    private var messages: [[String: String]] = []

    /// `packageURL` is the exported `NAME.mlpackage`; its directory holds the manifest,
    /// `tokenizer.json`, `tokenizer_config.json` and the chat template.
    public init(packageURL: URL, computeUnits: MLComputeUnits = .all) async throws {
        model = try await PagedCoreMLModel(packageURL: packageURL, computeUnits: computeUnits)
        tokenizer = try await AutoTokenizer.from(modelFolder: packageURL.deletingLastPathComponent())
    }

    /// Streams the reply to `text`. Cancel the consuming task (or stop iterating) to stop it.
    public func send(_ text: String, maxTokens: Int = 256) -> AsyncThrowingStream<String, Error> {
        messages.append(["role": "user", "content": text])
        let history = messages
        return AsyncThrowingStream { continuation in
            let task = Task {
                do {
                    // The whole conversation is re-run from a fresh state each turn: simple,
                    // and correct whatever the template does to earlier turns.
                    model.reset()
                    let prompt = try tokenizer.applyChatTemplate(messages: history.map { $0 as [String: Any] })
                    var logits = try await model.forward(prompt)
                    var generated: [Int] = []
                    var emitted = ""
                    let stop = model.manifest.stopTokenIds
                    for _ in 0..<maxTokens {
                        try Task.checkCancellation()
                        let next = logits.indices.max { logits[$0] < logits[$1] }!
                        if stop.contains(next) { break }
                        generated.append(next)
                        // Decode the whole reply and send what is new: multi-byte characters
                        // split over tokens come out whole.
                        let text = tokenizer.decode(tokens: generated)
                        if text.count > emitted.count, !text.hasSuffix("\u{FFFD}") {
                            continuation.yield(String(text.dropFirst(emitted.count)))
                            emitted = text
                        }
                        if model.length >= model.manifest.maxContext { break }
                        logits = try await model.forward([next])
                    }
                    self.messages.append(["role": "assistant", "content": emitted])
                    continuation.finish()
                } catch {
                    continuation.finish(throwing: error)
                }
            }
            continuation.onTermination = { _ in task.cancel() }
        }
    }
}

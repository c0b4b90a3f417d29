import Foundation

/// `ondevice-manifest.json`, written next to the `.mlpackage` by the exporter.
public struct OndeviceManifest: Decodable, Sendable {
    public struct Feature: Decodable, Sendable {
        public let name: String
        public let dtype: String
    }

    public let format: String
    public let version: Int
    public let package: String
    public let modelId: String
    public let blockSize: Int
    public let numBlocks: Int
    public let maxContext: Int
    public let maxBlocksPerSequence: Int
    public let logits: String
    public let eosTokenIds: [Int]
    public let endOfTurnIds: [Int]
    public let tokenizer: String
    public let chatTemplate: String?
    public let inputs: [Feature]
    public let outputs: [Feature]
    public let states: [Feature]

    enum CodingKeys: String, CodingKey {
        case format, version, package, logits, tokenizer, inputs, outputs, states
        case modelId = "model_id"
        case blockSize = "block_size"
        case numBlocks = "num_blocks"
        case maxContext = "max_context"
        case maxBlocksPerSequence = "max_blocks_per_sequence"
        case eosTokenIds = "eos_token_ids"
        case endOfTurnIds = "end_of_turn_ids"
        case chatTemplate = "chat_template"
    }

    /// Reads the manifest in `directory` (the directory that holds the package).
    public static func load(from directory: URL) throws -> OndeviceManifest {
        let data = try Data(contentsOf: directory.appendingPathComponent("ondevice-manifest.json"))
        let manifest = try JSONDecoder().decode(OndeviceManifest.self, from: data)
        guard manifest.format == "ondevice-coreml" else {
            throw OndeviceKitError.badManifest("format \(manifest.format)")
        }
        return manifest
    }

    /// Tokens that end a reply: EOS and the chat template's end-of-turn markers.
    public var stopTokenIds: Set<Int> { Set(eosTokenIds).union(endOfTurnIds) }
}

public enum OndeviceKitError: Error, CustomStringConvertible {
    case badManifest(String)
    case contextFull(Int)
    case missingOutput(String)

    public var description: String {
        switch self {
        case .badManifest(let why): return "not an ondevice Core ML manifest: \(why)"
        case .contextFull(let max): return "the conversation exceeds the package's \(max) tokens"
        case .missingOutput(let name): return "the model returned no \(name)"
        }
    }
}

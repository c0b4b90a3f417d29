import CoreML
import Foundation

/// The exported program plus its KV state, for one sequence at a time.
///
/// The package takes the runtime's paged interface: each call passes the new tokens, their
/// positions, the KV slot of each (`block * blockSize + offset`), the sequence's block table
/// and its length. A single conversation owns blocks `0..<maxBlocksPerSequence` in order here;
/// an app serving several conversations gives each its own blocks of the shared pool.
@available(macOS 15.0, iOS 18.0, *)
public final class PagedCoreMLModel {
    public let manifest: OndeviceManifest
    private let model: MLModel
    private var state: MLState
    private let blockTable: [Int32]
    /// Tokens already in the KV state.
    public private(set) var length = 0

    public init(packageURL: URL, computeUnits: MLComputeUnits = .all) async throws {
        manifest = try OndeviceManifest.load(from: packageURL.deletingLastPathComponent())
        let compiled = try await MLModel.compileModel(at: packageURL)
        let configuration = MLModelConfiguration()
        configuration.computeUnits = computeUnits
        model = try await MLModel.load(contentsOf: compiled, configuration: configuration)
        state = model.makeState()
        blockTable = (0..<manifest.maxBlocksPerSequence).map { Int32($0) }
    }

    /// Forget the conversation (a fresh state; the old one is released).
    public func reset() {
        state = model.makeState()
        length = 0
    }

    /// Run `tokens` at the next positions; returns the last position's logits.
    public func forward(_ tokens: [Int]) async throws -> [Float] {
        let n = tokens.count
        guard length + n <= manifest.maxContext else {
            throw OndeviceKitError.contextFull(manifest.maxContext)
        }
        let bs = manifest.blockSize
        let positions = (length..<(length + n)).map { Int32($0) }
        let slots = positions.map { p in blockTable[Int(p) / bs] * Int32(bs) + p % Int32(bs) }
        let inputs = try MLDictionaryFeatureProvider(dictionary: [
            "input_ids": try Self.int32Array(tokens.map { Int32($0) }),
            "positions": try Self.int32Array(positions),
            "slot_mapping": try Self.int32Array(slots),
            "block_table": try Self.int32Array(blockTable),
            "seq_len": try Self.int32Array([Int32(length + n)]),
        ])
        let output = try await model.prediction(from: inputs, using: state)
        guard let logits = output.featureValue(for: "logits")?.multiArrayValue else {
            throw OndeviceKitError.missingOutput("logits")
        }
        length += n
        let vocab = logits.shape.last!.intValue
        let rows = logits.count / vocab
        return logits.withUnsafeBufferPointer(ofType: Float.self) { ptr in
            Array(ptr[((rows - 1) * vocab)..<(rows * vocab)])
        }
    }

    private static func int32Array(_ values: [Int32]) throws -> MLMultiArray {
        let array = try MLMultiArray(shape: [NSNumber(value: values.count)], dataType: .int32)
        array.withUnsafeMutableBufferPointer(ofType: Int32.self) { ptr, _ in
            for (i, v) in values.enumerated() { ptr[i] = v }
        }
        return array
    }
}

// Usage: ondevice-coreml-chat PATH/TO/NAME.mlpackage [cpu_only|cpu_and_ne|cpu_and_gpu|all]
import CoreML
import Foundation
import OndeviceKit

let args = CommandLine.arguments
guard args.count >= 2 else {
    FileHandle.standardError.write("usage: ondevice-coreml-chat NAME.mlpackage [units]\n".data(using: .utf8)!)
    exit(2)
}
let units: MLComputeUnits = switch args.count > 2 ? args[2] : "all" {
case "cpu_only": .cpuOnly
case "cpu_and_ne": .cpuAndNeuralEngine
case "cpu_and_gpu": .cpuAndGPU
default: .all
}
let session = try await ChatSession(packageURL: URL(fileURLWithPath: args[1]), computeUnits: units)
print("> ", terminator: "")
while let line = readLine() {
    for try await piece in session.send(line) {
        print(piece, terminator: "")
        fflush(stdout)
    }
    print("\n> ", terminator: "")
}

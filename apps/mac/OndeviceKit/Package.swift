// swift-tools-version:5.10
// OndeviceKit: run a model exported with `ondevice convert MODEL --to coreml` in a Mac or iOS
// app. Built on macOS with Xcode 16 / Swift 5.10+; not built in this repository's Linux CI.
import PackageDescription

let package = Package(
    name: "OndeviceKit",
    platforms: [.macOS(.v15), .iOS(.v18)],  // stateful Core ML programs (MLState)
    products: [
        .library(name: "OndeviceKit", targets: ["OndeviceKit"]),
        .executable(name: "ondevice-coreml-chat", targets: ["ondevice-coreml-chat"]),
    ],
    dependencies: [
        // tokenizer.json + chat template support (Hugging Face's Swift tokenizers).
        .package(url: "https://github.com/huggingface/swift-transformers", from: "0.1.17"),
    ],
    targets: [
        .target(
            name: "OndeviceKit",
            dependencies: [.product(name: "Transformers", package: "swift-transformers")]
        ),
        .executableTarget(name: "ondevice-coreml-chat", dependencies: ["OndeviceKit"]),
    ]
)

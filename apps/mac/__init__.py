"""The Mac embedding kit: a Python example of embedding the runtime in an app
(:mod:`.embed_example`) and a Swift package sample that runs an exported Core ML package
(``apps/mac/OndeviceKit``, built on macOS with Xcode / SwiftPM)."""

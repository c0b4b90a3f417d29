// Decode matrix-vector product for float16 weights read as packed pairs: one vec4<u32> load
// brings 8 weights (unpack2x16float widens them), where a vec4<f16> load brings 4. Shader
// compilers that run on CPUs (lavapipe) pay per loaded component, so this halves the loads per
// weight. Otherwise as gemv.wgsl: CR weight rows per invocation, up to RT rows of x.
// Needs in_features % 8 == 0 (the backend uses gemv.wgsl otherwise).
override WG: u32 = 64u;
const RT: u32 = $RT;
const CR: u32 = $CR;

struct P { rows: u32, nin: u32, nout: u32, ystride: u32, yoff: u32, has_bias: u32, _a: u32, _b: u32 }

@group(0) @binding(0) var<uniform> p: P;
@group(0) @binding(1) var<storage, read> w: array<vec4<u32>>;  // [nout, nin / 8]
@group(0) @binding(2) var<storage, read> x: array<vec4<f32>>;  // [rows, nin / 4]
@group(0) @binding(3) var<storage, read> bias: array<f32>;
@group(0) @binding(4) var<storage, read_write> y: array<f32>;

@compute @workgroup_size(WG)
fn main(@builtin(workgroup_id) wid: vec3<u32>, @builtin(num_workgroups) nwg: vec3<u32>,
        @builtin(local_invocation_index) lid: u32) {
    let r0 = ((wid.x + wid.y * nwg.x) * WG + lid) * CR;
    if (r0 >= p.nout) { return; }
    let n8 = p.nin / 8u;
    let n4 = p.nin / 4u;
    var acc: array<array<f32, CR>, RT>;
    var wb: array<u32, CR>;
    for (var c = 0u; c < CR; c++) { wb[c] = min(r0 + c, p.nout - 1u) * n8; }
    for (var k = 0u; k < n8; k++) {
        var lo: array<vec4<f32>, CR>;
        var hi: array<vec4<f32>, CR>;
        for (var c = 0u; c < CR; c++) {
            let u = w[wb[c] + k];
            lo[c] = vec4<f32>(unpack2x16float(u.x), unpack2x16float(u.y));
            hi[c] = vec4<f32>(unpack2x16float(u.z), unpack2x16float(u.w));
        }
        for (var t = 0u; t < RT; t++) {
            let xb = min(t, p.rows - 1u) * n4 + 2u * k;
            let x0 = x[xb];
            let x1 = x[xb + 1u];
            for (var c = 0u; c < CR; c++) { acc[t][c] += dot(lo[c], x0) + dot(hi[c], x1); }
        }
    }
    for (var c = 0u; c < CR; c++) {
        let r = r0 + c;
        if (r >= p.nout) { break; }
        var b = 0.0;
        if (p.has_bias != 0u) { b = bias[r]; }
        for (var t = 0u; t < min(RT, p.rows); t++) {
            y[t * p.ystride + p.yoff + r] = acc[t][c] + b;
        }
    }
}

// Tiled matrix product for prefill, dense weights: y[t, yoff + r] = dot(x[t, :], W[r, :]) (+ b).
// Each invocation computes an RT x CT register tile (RT rows of x, CT rows of W), so every
// loaded vector of x is used CT times and every vector of W RT times.
// Template: $ENABLE, $WV, $XV, $DOT as in gemv.wgsl.
$ENABLE
override WGX: u32 = 8u;
override WGY: u32 = 8u;
const RT: u32 = $RT;
const CT: u32 = $CT;

struct P { rows: u32, nin: u32, nout: u32, ystride: u32, yoff: u32, has_bias: u32, _a: u32, _b: u32 }

@group(0) @binding(0) var<uniform> p: P;
@group(0) @binding(1) var<storage, read> w: array<$WV>;
@group(0) @binding(2) var<storage, read> x: array<$XV>;
@group(0) @binding(3) var<storage, read> bias: array<f32>;
@group(0) @binding(4) var<storage, read_write> y: array<f32>;

// Scalar product, the $DOT of scalar loads (sizes not divisible by 4).
fn mul1(a: f32, b: f32) -> f32 { return a * b; }

@compute @workgroup_size(WGX, WGY)
fn main(@builtin(workgroup_id) wid: vec3<u32>, @builtin(local_invocation_id) lid: vec3<u32>) {
    let c0 = (wid.x * WGX + lid.x) * CT;
    let r0 = (wid.y * WGY + lid.y) * RT;
    if (c0 >= p.nout || r0 >= p.rows) { return; }
    var acc: array<array<f32, CT>, RT>;
    // Rows past the edge read the last valid row (their results are not stored).
    var wb: array<u32, CT>;
    for (var c = 0u; c < CT; c++) { wb[c] = min(c0 + c, p.nout - 1u) * p.nin; }
    var xb: array<u32, RT>;
    for (var t = 0u; t < RT; t++) { xb[t] = min(r0 + t, p.rows - 1u) * p.nin; }
    for (var k = 0u; k < p.nin; k++) {
        var wv: array<$XV, CT>;
        for (var c = 0u; c < CT; c++) { wv[c] = $XV(w[wb[c] + k]); }
        for (var t = 0u; t < RT; t++) {
            let xv = x[xb[t] + k];
            for (var c = 0u; c < CT; c++) { acc[t][c] += $DOT(xv, wv[c]); }
        }
    }
    for (var c = 0u; c < CT; c++) {
        if (c0 + c >= p.nout) { break; }
        var b = 0.0;
        if (p.has_bias != 0u) { b = bias[c0 + c]; }
        for (var t = 0u; t < RT; t++) {
            if (r0 + t < p.rows) { y[(r0 + t) * p.ystride + p.yoff + c0 + c] = acc[t][c] + b; }
        }
    }
}

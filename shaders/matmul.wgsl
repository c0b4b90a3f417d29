// Tiled matrix product for prefill, dense weights: y[t, yoff + r] = dot(x[t, :], W[r, :]) (+ b).
// Each invocation computes RT rows of x against 4 rows of W, so every loaded vector of x is
// used 4 times and every vector of W RT times. The 4 weight rows are named variables and the
// accumulators vec4s (one lane per weight row): shader compilers for CPUs (lavapipe) keep those
// in registers, where a 2-D private array indexed in loops goes to memory (measured 1.5-3x).
// Template: $ENABLE, $WV, $XV, $DOT as in gemv.wgsl.
$ENABLE
override WGX: u32 = 8u;
override WGY: u32 = 8u;
const RT: u32 = $RT;

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
    let c0 = (wid.x * WGX + lid.x) * 4u;
    let r0 = (wid.y * WGY + lid.y) * RT;
    if (c0 >= p.nout || r0 >= p.rows) { return; }
    var acc: array<vec4<f32>, RT>;
    // Rows past the edge read the last valid row (their results are not stored).
    let last = p.nout - 1u;
    let w0 = min(c0, last) * p.nin;
    let w1 = min(c0 + 1u, last) * p.nin;
    let w2 = min(c0 + 2u, last) * p.nin;
    let w3 = min(c0 + 3u, last) * p.nin;
    var xb: array<u32, RT>;
    for (var t = 0u; t < RT; t++) { xb[t] = min(r0 + t, p.rows - 1u) * p.nin; }
    for (var k = 0u; k < p.nin; k++) {
        let a = $XV(w[w0 + k]);
        let b = $XV(w[w1 + k]);
        let c = $XV(w[w2 + k]);
        let d = $XV(w[w3 + k]);
        for (var t = 0u; t < RT; t++) {
            let xv = x[xb[t] + k];
            acc[t] += vec4<f32>($DOT(xv, a), $DOT(xv, b), $DOT(xv, c), $DOT(xv, d));
        }
    }
    var bv = vec4<f32>(0.0);
    if (p.has_bias != 0u) {
        bv = vec4<f32>(bias[min(c0, last)], bias[min(c0 + 1u, last)], bias[min(c0 + 2u, last)],
                       bias[min(c0 + 3u, last)]);
    }
    for (var t = 0u; t < RT; t++) {
        if (r0 + t >= p.rows) { break; }
        let v = acc[t] + bv;
        let o = (r0 + t) * p.ystride + p.yoff + c0;
        y[o] = v.x;
        if (c0 + 1u < p.nout) { y[o + 1u] = v.y; }
        if (c0 + 2u < p.nout) { y[o + 2u] = v.z; }
        if (c0 + 3u < p.nout) { y[o + 3u] = v.w; }
    }
}

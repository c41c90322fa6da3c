// A small app on the generated Kotlin bindings of adclick-ffi, run on the JVM by
// tests/tests/ffi_bindings.rs (JNA loads libadclick_ffi.so from -Djna.library.path). The
// twin of sdk-ffi/tests/python/client.py: the same modes and output (see there).

import java.io.File
import java.util.concurrent.CountDownLatch
import java.util.concurrent.TimeUnit
import kotlin.system.exitProcess
import uniffi.adclick_ffi.ClickDimensions
import uniffi.adclick_ffi.Device
import uniffi.adclick_ffi.FlushCallback
import uniffi.adclick_ffi.FlushResult
import uniffi.adclick_ffi.Tracker
import uniffi.adclick_ffi.TrackerConfig
import uniffi.adclick_ffi.TrackerException
import uniffi.adclick_ffi.TrackerStats

fun say(tag: String, vararg kv: Pair<String, Any>) =
    println(tag + " " + kv.joinToString(" ") { "${it.first}=${it.second}" })

fun expect(cond: Boolean, what: String) {
    if (!cond) {
        System.err.println("unexpected: $what")
        exitProcess(1)
    }
}

fun stats(t: Tracker): TrackerStats {
    val s = t.stats()
    say("stats", "sent" to s.sent, "queued" to s.queued, "pending" to s.pending,
        "restored" to s.restored, "invalid" to s.invalid, "held" to s.held,
        "dropped_consent" to s.droppedConsent, "rejected" to s.rejected)
    return s
}

/** flush() returns at once; the callback (on the SDK's thread) says how it went. */
fun flush(t: Tracker): FlushResult {
    val done = CountDownLatch(1)
    var result: FlushResult? = null
    t.flush(object : FlushCallback {
        override fun onComplete(result_: FlushResult) {
            result = result_
            done.countDown()
        }
    })
    expect(done.await(60, TimeUnit.SECONDS), "flush callback not called within 60 s")
    val r = result!!
    say("flush", "delivered" to r.delivered, "unsent" to r.unsent)
    return r
}

fun main(args: Array<String>) {
    val (mode, endpoint, queueDir) = Triple(args[0], args[1], args[2])
    val tokens = if (args.size > 3) File(args[3]).readText().split(Regex("\\s+")).filter { it.isNotEmpty() } else listOf()
    val dims = ClickDimensions(country = "US", device = Device.MOBILE, os = "android",
        app = "com.example.news", userId = "u-1")
    when (mode) {
        "send" -> Tracker(TrackerConfig(endpoint = endpoint, queueDir = queueDir, batchSize = 25u)).use { t ->
            for (tok in tokens + tokens.take(1)) t.trackClick(tok, dims)
            try {
                t.trackClick("not a token!", dims)
                expect(false, "an invalid token was accepted")
            } catch (e: TrackerException.InvalidToken) {
            }
            val r = flush(t)
            expect(r.delivered && r.unsent == 0UL, "flush did not deliver everything")
            val s = stats(t)
            expect(s.sent == (tokens.size + 1).toULong() && s.invalid == 1UL, "stats")
        }
        "offline" -> {
            val t = Tracker(TrackerConfig(endpoint = endpoint, queueDir = queueDir, maxAttempts = 1u,
                flushIntervalMs = 3_600_000UL))
            for (tok in tokens) t.trackClick(tok, dims)
            val r = flush(t)
            expect(!r.delivered && r.unsent == tokens.size.toULong(), "the collector was supposed to be down")
            stats(t)
            // The process ends without a shutdown: the clicks are in queueDir.
        }
        "resume" -> Tracker(TrackerConfig(endpoint = endpoint, queueDir = queueDir)).use { t ->
            val r = flush(t)
            expect(r.delivered && r.unsent == 0UL, "stored clicks not delivered")
            stats(t)
        }
        "consent" -> Tracker(TrackerConfig(endpoint = endpoint, queueDir = queueDir, consent = false)).use { t ->
            expect(t.consent() == "pending", "consent at start")
            t.trackClick(tokens[0], dims)
            t.trackClick(tokens[1], dims)
            expect(!flush(t).delivered, "sent without consent")
            expect(t.stats().held == 2UL, "held")
            t.setConsent(true)
            expect(flush(t).delivered, "not delivered after consent")
            t.setConsent(false)
            t.trackClick(tokens[2], dims)
            val r = flush(t)
            expect(r.delivered && r.unsent == 0UL, "nothing may be left after withdrawal")
            val s = stats(t)
            expect(s.sent == 2UL && s.droppedConsent == 1UL, "consent stats")
        }
        else -> expect(false, "unknown mode $mode")
    }
    say("ok", "mode" to mode)
    // The SDK's thread is a daemon of the native library; end the JVM explicitly.
    exitProcess(0)
}

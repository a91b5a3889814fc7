/*
 * Test launcher: runs QuPath scripts against the stand-ins in stubs/ (not QuPath).
 *
 *   groovy -cp tests/groovy/stubs tests/groovy/launcher.groovy [--compile-only] [--fx] SCRIPT...
 *
 * QuPath gives every script its scripting methods as default imports (a static import of QP,
 * or of QPEx, which extends it). This launcher does the same with an ImportCustomizer, so the
 * script files run unchanged. Each script is compiled (and, without --compile-only, run) in a
 * fresh GroovyShell; one line per script is printed:
 *   [launcher] NAME: ok
 *   [launcher] NAME: FAILED: <exception class>: <message>
 * The exit code is 0 when every script succeeded, 1 otherwise. Works on Groovy 2.4 and later.
 * --fx starts the JavaFX toolkit first, as QuPath has it running (JavaFX must be on the class
 * path: -cp tests/groovy/stubs:/usr/share/openjfx/lib/javafx.base.jar:...).
 */
import org.codehaus.groovy.control.CompilerConfiguration
import org.codehaus.groovy.control.customizers.ImportCustomizer

boolean compileOnly = false
boolean fx = false
List<File> files = []
for (String arg : args) {
    if (arg == '--compile-only')
        compileOnly = true
    else if (arg == '--fx')
        fx = true
    else
        files << new File(arg)
}
if (fx && !compileOnly) {  // by reflection: the launcher itself runs without JavaFX too
    Class platform = Class.forName('javafx.application.Platform')
    java.util.concurrent.CountDownLatch started = new java.util.concurrent.CountDownLatch(1)
    platform.getMethod('startup', Runnable).invoke(null, { started.countDown() } as Runnable)
    started.await()
    platform.getMethod('setImplicitExit', boolean).invoke(null, false)
}
if (files.isEmpty()) {
    System.err.println('usage: launcher.groovy [--compile-only] [--fx] SCRIPT...')
    System.exit(2)
}

ImportCustomizer imports = new ImportCustomizer()
imports.addStaticStars('qupath.lib.scripting.QP')
imports.addImports('qupath.lib.objects.PathObject', 'qupath.lib.objects.PathObjects',
        'qupath.lib.objects.classes.PathClass', 'qupath.lib.io.GsonTools',
        'qupath.lib.images.servers.ImageServer')
CompilerConfiguration config = new CompilerConfiguration()
config.addCompilationCustomizers(imports)

int failures = 0
for (File file : files) {
    GroovyShell shell = new GroovyShell(this.class.classLoader, new Binding(), config)
    try {
        Script script = shell.parse(file)
        if (!compileOnly)
            script.run()
        System.out.flush()
        println("[launcher] ${file.name}: ok")
    } catch (Throwable t) {
        failures++
        System.out.flush()
        if (System.getProperty('launcher.trace'))
            t.printStackTrace()
        println("[launcher] ${file.name}: FAILED: ${t.getClass().getName()}: ${t.getMessage()}")
    }
}
System.out.flush()
System.exit(failures == 0 ? 0 : 1)
